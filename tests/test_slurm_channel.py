"""The channel of a Slurm launch (engine/slurm/agents.py) is a network socket, so it is authenticated: a
connection without the launch's secret is refused before any byte of it is unpickled, and the node
process that holds the secret is accepted. Real sockets and a real node-side client; no Slurm."""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading

from mpify.engine.slurm import agents as slurm


class Bomb:
    """Unpickling this creates a file: the proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_connection_without_the_secret_is_refused_unread(tmp_path):
    listener, secret = slurm.open_channel("127.0.0.1")
    address = listener.address
    proof = tmp_path / "unpickled"
    # stands for a node's step: a live process the accept loop watches
    step = slurm.Step(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    rogue_said = []

    def rogue():
        # a raw pickle of the bomb, and a length-prefixed one as multiprocess frames messages
        data = pickle.dumps(Bomb(str(proof)))
        with socket.create_connection(address) as s:
            s.sendall(len(data).to_bytes(4, "big") + data)
            try:
                rogue_said.append(s.recv(1024))
            except OSError:
                pass
        with socket.create_connection(address) as s:
            s.sendall(data)
        with socket.create_connection(address) as s:  # claims to be the node, without the secret
            s.sendall(len(b"n2").to_bytes(4, "big") + b"n2")

    def node():
        from multiprocess.connection import Client

        conn = Client(address, authkey=secret)
        conn.send_bytes(b"n2")
        conn.send_bytes(b"the real node")
        conn.close()

    got = {}
    try:
        accepting = threading.Thread(target=lambda: got.update(slurm._accept(listener, [("n2", 1, step)])))
        accepting.start()
        rogue()  # both its connections are dealt with before the node's comes
        node()
        accepting.join(30)
        conns = got
        assert list(conns) == ["n2"]
        assert not proof.exists(), "a connection without the secret was unpickled"
        # what the rogue got back was the challenge, not a welcome
        assert rogue_said and rogue_said[0].startswith(b"\x00\x00") and b"#CHALLENGE#" in rogue_said[0]
        assert conns["n2"].recv_bytes() == b"the real node"
        conns["n2"].close()
    finally:
        listener.close()
        step.popen.kill()
        step.popen.wait()
        step.close()
    assert not os.path.exists(proof)
