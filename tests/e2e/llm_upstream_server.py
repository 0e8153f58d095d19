"""A real OpenAI-compatible upstream for the tests: xllamacpp's server with SmolLM2-135M.

Run as `python tests/e2e/llm_upstream_server.py PORT` with the API key in the environment variable
`UPSTREAM_API_KEY` (not on the command line, where `ps` shows it). Listens on 127.0.0.1:PORT (0: a
free port), one thread, demands the key; prints `READY http://127.0.0.1:<port>` once the model is
loaded, then serves until SIGTERM or stdin closes.
"""

from __future__ import annotations

import os
import signal
import sys

import xllamacpp as xlc

from bastion.llm.local import smollm2_path


def main() -> None:
    port = int(sys.argv[1])
    params = xlc.CommonParams()
    params.model.path = str(smollm2_path())
    params.n_ctx = 1024
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.n_threads_http = 2
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.api_keys = [os.environ["UPSTREAM_API_KEY"]]
    params.cors_origins = ""
    params.ui = False
    params.endpoint_slots = False
    params.warmup = False
    params.verbosity = -1
    server = xlc.Server(params)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever llama.cpp installed: die on SIGTERM
    print(f"READY {server.listening_address}", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)


if __name__ == "__main__":
    main()
