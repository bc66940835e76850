"""A live world: ranks that stay between calls (`World`, and the `%%ranch` cells of the extension).

- world.py: `World`: starting its ranks once, the public calls (run, exec, push, pull, status),
  closing; the class is made of this module and of rounds.py, stop.py and supervisor.py;
- rounds.py: a round: one command to some ranks, every reply waited for, the outcome;
- stop.py: how a round stops (ask, break, kill), and the world's group rebuilt after a break;
- supervisor.py: the thread that reads every rank's output, replies and exit, all the time;
- members.py: what the caller holds of each rank (`_Member`), and where its lines go;
- rank.py: a world's rank: a child that stays, keeps a namespace, answers commands;
- unstick.py: freeing a rank stuck in a collective whose peers will never come.

Each round keeps a launch's promises with the launch's own pieces (launch/).
"""
