"""Defaults and the messages of the rules between options, word for word as the modules that
check them at run time say them (tests match them)."""

#: Version of the config JSON; a file of another version is refused.
CONFIG_VERSION = 1
#: Defaults that other modules repeat today (allocator, kv.allocate, repair, folding, search).
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_KV_TOKENS = 1024
DEFAULT_ALPHA = 0.5
DEFAULT_PROFILER = "fisher"
DEFAULT_REPAIR_BUDGET = 24
DEFAULT_REPAIR_TOLERANCE = 0.1
DEFAULT_REPAIR_TOKENS = 2048
DEFAULT_REPAIR_GROUPS = "unit"
DEFAULT_KV_METHOD = "kl"
NATS_METHODS = ("kl", "loss")

# Messages of the rules between options, word for word as the modules that check them at run
# time say them (tests match them), so the config's early check and the late one agree.
NO_BUDGET = (
    "pass avg_bits (--avg-bits), the budget in average bits per weight (e.g. 3.25), a file "
    "size (max_file_bytes, --file-size, with --target gguf or ct), or a KV "
    "cache budget: kv_avg_bits (--kv-avg-bits) or memory_bytes (--memory)"
)
KV_WITHOUT_BUDGET = (
    "{given} sizes the KV cache; pass kv_avg_bits= (a KV budget) or memory_bytes= (one weights "
    "+ KV budget) with it"
)
MEMORY_ALONE = (
    "memory_bytes is one budget for weights and KV cache and decides their split itself; pass "
    "it alone, or pass avg_bits (weights) and kv_avg_bits (KV cache) instead"
)
MEMORY_NEEDS_CONTEXT = (
    "a memory budget needs the context the KV cache must hold: pass context_len= (tokens) and "
    "batch_size= (sequences, default 1)"
)
RL_NO_KV = (
    "the rl solver allocates weight matrices only (its embedding reads weights); choose "
    "lagrangian, dp, ilp or qp for the KV cache"
)
JOINT_NEEDS_NATS = (
    "a joint memory budget adds weight and KV losses, so the KV profile must be in nats: use "
    "kv_profiler in {methods}, not {method!r}"
)
CONTEXT_BATCH = "{what} must be a positive integer (tokens / sequences), got {value!r}"
CALIBRATION_TOKENS = "calibration tokens must be a positive integer, got {value!r}"
INTERACTIONS_WITH_PROFILE = (
    "interactions are measured while profiling; with a saved profile pass "
    "interactions_from=<profile holding them> instead"
)
POLICY_NEEDS_RL = "policy= applies an RL policy; use solver='rl', not {solver!r}"
REPAIR_BUDGET = "the repair budget must allow >= 2 evaluations, not {budget}"
REPAIR_TOLERANCE = "the repair tolerance must be >= 0, not {tolerance}"
ALPHA_NOT_NUMBER = "alpha must be a number in (0, 1), got {alpha!r}"
ALPHA_RANGE = "alpha must be in (0, 1) (migration strength; 0.5 is the usual choice), got {alpha}"
UNKNOWN_PROFILER = "unknown profiler {name!r}; choose one of {choices}"
SEARCH_NO_BUDGET = "pass avg_bits, the budget in average bits per weight (e.g. 3.25)"
PREDATES_CONFIG = "this allocation file predates recorded configs; pass the options again"
FOLDING_KV_ONLY = (
    "scale folding changes how weights quantize; with kv_avg_bits alone the weights "
    "stay at fp16, so pass avg_bits too or leave scale_folding off"
)
IMATRIX_FOLDING = (
    "an importance matrix file (imatrix) was gathered on the unfolded model, and scale folding "
    "rescales the columns it weights: use one or the other"
)
