"""Which calls change state: the analyzer's one table of known effects.

Why a module of its own: a slice keeps a statement that is otherwise not needed only when it may
change something the target reads, and "may change" is the whole question for calls. Reading every
call on a name the analyzer cannot identify as "changes that name" made real notebooks keep their
exploration, old training loops and demos (issue 11): `x = torch.stack([a, b]).norm()` was kept as
"mutates `torch`". The rule here is the other way round: a call changes state only if it is known to.

- A call on a module, a class or a function (imported, star-supplied, or defined by `def`/`class`)
  changes nothing unless a table below lists it: `SEED_CALLS` and `CONFIG_CALLS` change the state
  of the module they are called on (`np.random.seed(0)`, `torch.set_num_threads(1)`,
  `os.chdir(d)`), `RECEIVER_MUTATORS` change the object they are called on (`sys.path.append(p)`,
  `os.environ.update(..)`), `ARG_MUTATORS` and torch's trailing-underscore ops change their first
  argument (`random.shuffle(xs)`, `nn.init.zeros_(w)`).
- A method call on a notebook object (a value the notebook assigned), or calling the object
  (`model(xb)`), may change that object unless the method is a known query or display
  (`QUERY_METHODS`, `QUERY_PREFIXES`: `df.head()`, `learn.show_results()`) or writes a file
  (`WRITE_CALLS`: `tok.save_pretrained(d)`); `model.to(dev)` and `opt.step()` are mutations.
- Drawing random numbers (`DRAW_CALLS`: `rng.normal()`, `torch.randn(3)`) changes only the
  generator's position; a statement whose only effect is a draw is left out (the generator's state
  is what the last seed call made it, see `SEED_CALLS`), except in faithful mode, which keeps every
  draw after the last seed, on modules and notebook objects, for exact reproduction.
- A notebook function changes what its body changes; that is computed from the body by the visitor
  (`FunctionSummary`) and followed through the notebook functions it calls (summaries.py), not
  listed here.

Assignments, augmented assignments and `del` on an attribute or item (`cfg["lr"] = 0.1`,
`torch.backends.cudnn.benchmark = True`) are mutations of the root name whatever it is; the visitor
handles them, this module only names calls.

Through which names a change reaches an object (issue 16) is the may-alias model of aliases.py; the
tables it reads are at the end of this module (`FRESH_CALLS`, `FRESH_ATTRS`, `COMPUTE_CALLS`,
`GRAD_CALLS`, `GRAD_OBSERVERS`), with the rules beside them.
"""
from __future__ import annotations

__all__ = ["MUTATION_RANK", "combine_kinds", "FRESH_CALLS", "FRESH_BUILTINS", "VIEW_CALLS", "FRESH_ATTRS", "COMPUTE_CALLS", "GRAD_CALLS", "GRAD_OBSERVERS",
           "STATELESS_BUILTINS", "STATELESS_OF_ARGS", "STATELESS_METHODS", "STATELESS_MODULE_ATTRS",
           "STATELESS_MODULE_CALLS", "STR_METHODS",
           "SEED_CALLS", "FULL_SEED_CALLS", "seeds_whole", "GENERATOR_USERS", "SEED_ALL_CALLS", "CONFIG_CALLS", "STATE_CALLS", "BARE_STATE_CALLS", "RECEIVER_MUTATORS",
           "ARG_MUTATORS", "QUERY_METHODS", "QUERY_PREFIXES", "DRAW_CALLS", "WRITE_CALLS",
           "PURE_BUILTINS", "OPAQUE_CALLS", "LAUNCHERS", "is_inplace", "changes_first_arg",
           "is_query", "is_draw", "external_method_changes_receiver"]


# How a statement may change a name, weakest first: 'called' (the object is called: `model(x)`),
# 'call-arg' (passed to a call that may change it), 'draw', 'grad' (a backward writes its `.grad`),
# 'alias' (changed through a name that may share it, aliases.py), 'state', 'seed', 'direct'.
MUTATION_RANK = {"called": 0, "call-arg": 0, "draw": 1, "grad": 2, "alias": 2, "state": 2, "seed": 3,
                 "direct": 4}


def combine_kinds(old, new):
    """Two ways one call changes a name: the stronger, except that a function that seeds a
    generator and draws from it is a draw (`print_sampled_tokens` seeds, then samples): it leaves
    the generator somewhere, as any draw does, and a later seed makes that irrelevant."""
    if old is None or old == new:
        return new
    if {old, new} == {"seed", "draw"}:
        return "draw"
    return new if MUTATION_RANK[new] > MUTATION_RANK[old] else old


def _words(text: str) -> frozenset:
    return frozenset(text.split())


# Seed calls: each one redefines a generator's state, so what was drawn before it no longer matters.
SEED_CALLS = _words("""
seed manual_seed manual_seed_all set_rng_state set_seed seed_everything set_random_seed
""")
# Seed calls that set every generator of what they are called on: `torch.manual_seed(0)` seeds the
# CPU generator and every device's, so an earlier seed of `torch` no longer matters.
# `torch.cuda.manual_seed(0)` sets the CUDA generators only, and `torch.set_rng_state(s)` the CPU
# one only: a seed of `torch` made before either still decides what the other generators draw.
FULL_SEED_CALLS = _words("seed manual_seed set_seed seed_everything set_random_seed")
DEVICE_MODULES = _words("cuda mps xpu npu hpu mtia")
# Packages whose code draws from another package's global generators: a torch model's layers
# initialise their weights from torch's (`nn.Linear(3, 8)`), a `transformers` head too, sklearn's
# `train_test_split` draws from numpy's when given no `random_state`, fastai's transforms from
# python's `random`. A slice keeps the seeds of a package for what it reads of these (seeds.py).
GENERATOR_USERS = {
    "torch": _words("""torchvision torchaudio torchtext transformers lightning pytorch_lightning timm
                       accelerate fastai diffusers torch_geometric ignite peft trl sentence_transformers
                       skorch"""),
    "numpy": _words("sklearn pandas scipy datasets fastai skimage"),
    "random": _words("fastai datasets"),
}
# Seed calls that seed python's `random`, numpy's and torch's generators at once (Lightning's
# `pl.seed_everything`, transformers' and accelerate's `set_seed`): what draws from any of those
# depends on them.
SEED_ALL_CALLS = _words("seed_everything set_seed")
# Global configuration read later by other calls of the same module (or the process).
CONFIG_CALLS = _words("""
set_default_dtype set_default_device set_default_tensor_type set_num_threads set_num_interop_threads
use_deterministic_algorithms set_deterministic_debug_mode set_float32_matmul_precision
set_grad_enabled set_anomaly_enabled set_flush_denormal set_printoptions filterwarnings simplefilter
resetwarnings basicConfig setLevel disable use chdir putenv unsetenv set_option reset_option
setrecursionlimit set_style set_theme set_context set_palette rc rcdefaults seterr
enable_eager_execution set_visible_devices set_memory_growth register set_verbosity
set_verbosity_error set_verbosity_warning disable_progress_bar enable_progress_bar
set load_dotenv download pandas init login notebook_login start_run set_experiment set_tracking_uri
autolog
""")
# (`sns.set()` configures seaborn; `load_dotenv()` writes os.environ; `nltk.download(..)` writes the
# data later calls read; `tqdm.pandas()` registers `progress_apply` on DataFrames; `wandb.init()`,
# `mlflow.start_run()` open the run that `wandb.log`/`mlflow.log_metric` in the target write to;
# `login()`/`notebook_login()` store the token later downloads use.)
# Module-level calls that change module state read later by other calls (suffix of the dotted name).
STATE_CALLS = SEED_CALLS | CONFIG_CALLS
# STATE_CALLS a star import may supply as bare functions (`from torch import *`, then
# `manual_seed(0)`): the module-specific ones, not generic names like `use` or `register`.
BARE_STATE_CALLS = STATE_CALLS - _words("disable rc use setLevel putenv unsetenv register set download pandas init")
# Methods known to change the object they are called on. On a notebook object every method but a
# query is read as a mutation anyway; this table matters for objects reached through a module or an
# import (`sys.path.append`, `os.environ.setdefault`, `defaults.callbacks.append`).
RECEIVER_MUTATORS = _words("""
append extend insert remove pop clear sort reverse update setdefault popitem add discard
difference_update intersection_update symmetric_difference_update appendleft extendleft popleft rotate
to train eval load_state_dict register_buffer register_parameter register_module add_module apply
register_forward_hook register_forward_pre_hook register_full_backward_hook requires_grad_ zero_grad
step add_param_group set_format set_transform reset_format cast_column rename_column_ set_epoch fill
""")
# (`fill`: numpy's in-place fill, `np.asarray(y).fill(0)`.)
# Module functions that change their first argument; and the builtin `next`, which advances its
# iterator (and what the iterator was made from: a generator is its own iterator).
ARG_MUTATORS = _words("""
shuffle heappush heappop heapify heapreplace heappushpop insort insort_left insort_right copyto
fill_diagonal put place putmask next
""")
# Methods that only read their receiver or display it (besides the `QUERY_PREFIXES`).
QUERY_METHODS = _words("""
copy keys values items get count index head tail describe info summary ls shape sample to_numpy numpy
item tolist astype reshape view sum mean std var max min argmax argmin prod cumsum abs round all any
startswith endswith format join split rsplit strip lstrip rstrip lower upper title replace find
rfind encode decode isdigit isalpha groupby agg aggregate query filter nunique unique value_counts
isna notna isnull notnull dropna fillna merge to_dict to_string to_list hist size dim numel
parameters named_parameters state_dict children modules named_modules buffers named_buffers detach
clone contiguous unsqueeze squeeze permute transpose flatten norm exp log sqrt matmul dot sort_values
sort_index reset_index set_index rename drop where clip corr cov pivot pivot_table melt applymap
memory_usage equals isin between dtype type __len__ __getitem__ __repr__ __str__ __contains__
issubset issuperset union intersection difference symmetric_difference isdisjoint most_common
elements total read_text read_bytes exists is_file is_dir glob iterdir stat resolve absolute
with_suffix with_name relative_to
long int bool bincount argsort topk softmax log_softmax sigmoid tanh relu chunk unbind nonzero
repeat expand expand_as view_as reshape_as type_as eq ne gt lt ge le add sub mul div neg isnan
isfinite allclose equal nelement element_size stride is_contiguous ndimension gather index_select
masked_select cumprod diff median mode quantile logsumexp amax amin minimum maximum floor ceil sign
square mm bmm compute transform
""")
# (`metric.compute()` reads what was added (evaluate's empties it after, as a fresh metric is);
# `preprocessor.transform(ds)` applies what `fit` learned, the fitted state stays. `fit_transform`
# is not here.)
# Method-name prefixes of displays, summaries and getters (`show_batch`, `plot_loss`, `display_df`,
# `vocab.get_itos()`, `vocab.lookup_indices(tokens)`).
QUERY_PREFIXES = ("show", "plot", "display", "print", "summar", "describe", "get_", "lookup_")
# Getters that advance or empty what they are called on (`q.get_nowait()`, tf's
# `iterator.get_next()`): not queries, whatever the prefix says.
NOT_QUERIES = _words("get_nowait get_next")
# Functions and methods that draw random numbers: they move a generator, nothing else.
DRAW_CALLS = _words("""
random rand randn randint randrange randbytes getrandbits rand_like randn_like randint_like randperm
normal normal_ uniform gauss choice choices sample permutation integers standard_normal binomial
poisson beta gamma exponential multinomial bernoulli lognormal triangular vonmisesvariate
""")
# Calls whose string arguments name files they write (for the file-dependency warning: case 44 of
# slicing-cases.md; files are not names, so nothing links them to their readers).
WRITE_CALLS = _words("""
to_csv to_parquet to_json to_pickle to_excel to_feather to_hdf save savez savez_compressed savetxt
savefig write_text write_bytes dump imwrite save_pretrained
""")
# Builtins that neither mutate their arguments nor have effects a slice needs (display included).
PURE_BUILTINS = _words("""
print len repr str int float bool complex list tuple dict set frozenset bytes bytearray sorted
reversed enumerate zip map filter range sum min max abs round any all isinstance issubclass type id
hash hasattr getattr format divmod pow chr ord bin hex oct callable iter dir help super object
slice property staticmethod classmethod display ascii memoryview issubclass input open
""")
# Calls that define or read names dynamically: the statement becomes opaque.
OPAQUE_CALLS = frozenset({"exec", "eval", "globals", "locals", "vars", "get_ipython"})
# Functions that launch their first function argument on processes; never part of that slice.
LAUNCHERS = frozenset({"ranch", "notebook_launcher", "torchddp_launch", "in_torchddp", "spawn",
                       "start_processes", "Process", "launch"})


def seeds_whole(chain: list[str]) -> bool:
    """`chain` (the dotted call, `["torch", "manual_seed"]`) sets every generator of its root
    name (`FULL_SEED_CALLS`), not only a device's (`torch.cuda.manual_seed`)."""
    return chain[-1] in FULL_SEED_CALLS and not DEVICE_MODULES.intersection(chain[:-1])


def is_inplace(name: str) -> bool:
    """torch's convention: `add_`, `zero_`, `nn.init.kaiming_normal_` change their tensor in place.
    Dunders and private names (`__init__`, `_x`) are not in-place ops."""
    return name.endswith("_") and not name.startswith("_")


def changes_first_arg(name: str) -> bool:
    """A function of a module (or a star-supplied one) that changes its first argument."""
    return name in ARG_MUTATORS or is_inplace(name)


def is_query(method: str) -> bool:
    """A method that only reads or displays its receiver."""
    return method in QUERY_METHODS or (method.startswith(QUERY_PREFIXES) and method not in NOT_QUERIES)


def is_draw(method: str) -> bool:
    """A random draw that is not also an in-place fill (`x.normal_()` fills x: a mutation)."""
    return method in DRAW_CALLS and not is_inplace(method)


def external_method_changes_receiver(method: str, dotted: list | None, module_itself: bool) -> bool:
    """`mod.f(..)` or `mod.attr.f(..)` on a module, class or function: only listed calls change it.

    module_itself: the call is `mod.f(..)` on a module, where only `STATE_CALLS` count: a module
    function named `train` or `update` (`xgb.train(params, d)`) is a function, not a list method.
    On an object reached through it (`sys.path.append`, `plt.rcParams.update`) or on an imported
    object, the receiver mutators count too. `os.environ.<anything but a query>` changes the
    process environment."""
    if method in STATE_CALLS or (method in RECEIVER_MUTATORS and not module_itself):
        return True
    return bool(dotted) and "environ" in dotted and not is_query(method)


# ---- aliasing (issue 16): through which names a change reaches an object ---------------------------
#
# A change made through a name reaches every object that name may share memory or state with. The
# relation is computed from the statements (aliases.py): a name bound to an expression may be, or
# hold, every object the expression reads (`v = x.view(-1)`, `row = x[0]`, `for xb, yb in dl`,
# `dl = DataLoader(ds)`, `opt = SGD(model.parameters())`, `loss = calc_loss(w, x, y)`), because an
# unknown call may return its argument, a view of it, or an object holding it (`VIEW_CALLS` below
# says which results are the object itself). A list, tuple, dict or comprehension built of values
# holds them as elements: a change of an element reaches them, a change of the container does not.
# Sound by default: a call or expression not listed below holds whatever it reads. The lists only
# say where that is known not to hold:
#
# - `FRESH_CALLS`, `FRESH_BUILTINS`: the result is a new value that shares nothing with the inputs
#   and carries no autograd graph (`loss.item()`, `x.tolist()`, `len(xs)`, `copy.deepcopy(m)`,
#   `x.detach().clone()`, the last one recognised as a chain).
# - `FRESH_ATTRS`: attributes that are new plain values (`n = x.shape[1]` does not hold x).
# - `COMPUTE_CALLS`, and arithmetic (`a * b`, `-a`, `a @ w`): the result is new memory computed from
#   the inputs. Changing it in place changes none of them, but it carries their autograd graph
#   ("derived from" them), so a backward through it writes their `.grad` (see `GRAD_CALLS`), and a
#   change of one of its elements (`b[0].append(1)` after `b = sorted(a)`: a shallow copy holds the
#   same elements) reaches them too.
#
# Autograd is its own link: `loss.backward()` changes no value of `loss`, but writes the `.grad` of
# every tensor `loss` was computed from that requires gradients, even by arithmetic, which shares no
# memory. Which names hold such tensors is not visible statically, so it is read from how the
# notebook uses them (`GRAD_OBSERVERS`): a name whose `.grad` is read, whose `requires_grad` is set
# (`requires_grad_()`, `requires_grad=True` in the call that makes it, `nn.Parameter(..)`), whose
# `parameters()` are taken (an optimizer over it), whose `zero_grad()` is called, or that is called
# (`model(xb)`: a module). A backward through data that never requires gradients (`X`, `y`) changes
# nothing the slice reads, so an exploration cell's `loss.backward()` is not kept for `X`.

# Calls whose result shares nothing with its inputs and carries no autograd graph. (`round` and
# `abs` of a tensor return tensors: not here. `copy` is shallow for lists and dicts: a compute.)
FRESH_CALLS = _words("item tolist deepcopy numel dim size nelement element_size is_contiguous")
# The same for builtins called by name only: `float(x)` is a new number, but the method `x.float()`
# returns x itself when it is float already (a view, `VIEW_CALLS`).
FRESH_BUILTINS = _words("""
len float int str bool repr hash id isinstance issubclass callable format ord chr bin hex oct print
range hasattr type dir input
""")
# Attributes that are new plain values, not views of their object (`x.T`, `x.data`, `x.grad` are
# views or parts: not here).
FRESH_ATTRS = _words("shape dtype device ndim is_leaf requires_grad")
# New memory computed from the inputs: derived (autograd graph, shared elements), not shared.
# (`float`, `to`, `contiguous`, `type` are not here: they return their receiver itself when nothing
# needs converting. Python's `max`/`min` return an element: not here either.)
COMPUTE_CALLS = _words("""
mean sum std var prod norm exp log sqrt matmul mm bmm dot add sub mul div neg pow sigmoid tanh relu
softmax log_softmax argmax argmin cumsum cumprod clone copy cat stack tensor array sorted list tuple
set dict clamp clip where floor ceil sign square eq ne gt lt ge le logsumexp mse_loss cross_entropy
l1_loss nll_loss binary_cross_entropy binary_cross_entropy_with_logits smooth_l1_loss linear
einsum outer abs
""")
# Calls whose result is the object itself or a view of its memory: a change of the result is a
# change of the object, whatever the method. Any other call's result may *hold* what it was given
# (`opt = SGD(model.parameters())`, `dl = DataLoader(ds)`, `learn = Learner(dls, model)`): a known
# change of it (an in-place op, `RECEIVER_MUTATORS`: `opt.step()`, `opt.zero_grad()`,
# `load_state_dict`, `append`...) reaches what it holds, a method not known to change anything
# (`learn.fine_tune(1)`) changes the holder only. Why: issue 11 left a lesson's exploration
# training out of the slice of a later `train()` that builds its own learner over the same `dls`;
# reading every method of a learner as a change of its data loaders would keep it again.
VIEW_CALLS = _words("""
view view_as reshape reshape_as transpose permute expand expand_as narrow squeeze unsqueeze
flatten ravel detach numpy as_tensor asarray from_numpy contiguous float double half to type T
swapaxes movedim unflatten split chunk unbind select diagonal iter reversed zip enumerate get
items values keys __getitem__ values_list data
""")
# Calls that write the `.grad` of what their tensor was computed from: `loss.backward()`,
# `torch.autograd.backward(loss)`. `torch.autograd.grad(loss, w)` writes no `.grad` but frees the
# graph the inputs share (a later backward through it fails): read as a write too, for soundness.
GRAD_CALLS = _words("backward grad")
# Methods that show a name holds tensors whose gradients matter (see the notes above).
GRAD_OBSERVERS = _words("requires_grad_ parameters named_parameters zero_grad")


# ---- state-less values (issue 25, stateless.py): values no change can reach ----------------------
#
# A name bound to one of these holds nothing a call, a backward or a change through another name
# can change: `x = x.to(device)` does not change `device`, a backward does not write the gradients
# of the int a tensor's shape came from. Sound by default: a value is state-less only when one of
# these tables (or a literal, arithmetic on state-less values, a tuple of them) says so.

# Builtins whose result is a new number, string, bool, range or class, whatever they are given.
STATELESS_BUILTINS = _words("""
len int float str bool complex bytes repr ascii hash id isinstance issubclass callable ord chr bin
hex oct format hasattr range
""")
# Builtins whose result is one of their arguments or computed from them: state-less when the
# arguments are (`max(a, b)` is a or b; `round(t)` of a tensor is a tensor).
STATELESS_OF_ARGS = _words("max min abs round pow divmod")
# Methods whose result is a plain Python number or bool, whatever they are called on (`loss.item()`,
# `x.numel()`: tensor and numpy API); `torch.cuda.device_count()` and the like on a module.
STATELESS_METHODS = _words("""
item numel dim ndimension nelement element_size is_contiguous get_device is_floating_point
is_complex
""")
STATELESS_MODULE_CALLS = _words("device is_available device_count current_device dtype")
# Attributes of a module that are dtypes or constants (`torch.float32`, `np.int64`, `math.pi`).
STATELESS_MODULE_ATTRS = _words("""
float16 float32 float64 bfloat16 half float double complex64 complex128 cfloat cdouble int8 int16
int32 int64 uint8 uint16 uint32 uint64 long int short bool bool_ float_ int_ intc intp uint pi e
tau inf nan newaxis
""")
# String methods whose result is a str, bool or int: on a literal or a state-less name.
STR_METHODS = _words("""
format join upper lower strip lstrip rstrip replace title capitalize casefold zfill center ljust
rjust startswith endswith isdigit isalpha isalnum isspace islower isupper count find rfind encode
decode removeprefix removesuffix
""")
