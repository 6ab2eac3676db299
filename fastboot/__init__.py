"""fastboot: LLM inference replicas that start in seconds.

`fastboot serve MODEL [vllm serve flags]` boots vLLM once, snapshots the warmed process tree with
CRIU, and restores that snapshot on every later boot. This module stays import-light: the CLI and
`fastboot --help` must never pull in torch or vllm.
"""

__version__ = "0.1.0"
