"""llama.cpp (llama-cpp-python) prefill and decode speed on the embedded GGUF, for a side-by-side.

    /work/llama-venv/bin/python scripts/llamacpp_bench.py --gguf PATH --text plays.txt --lengths 2k,8k

Runs in its own venv, without lminf (llama-cpp-python builds llama.cpp from source, ~10-30 min on
2 cores):

    python3 -m venv /work/llama-venv
    /work/llama-venv/bin/pip install --no-binary llama-cpp-python --no-cache-dir llama-cpp-python

Never part of `make test` or CI.
For each length L: a fresh Llama(n_ctx=L, n_threads=--threads, n_batch=512), prefill of the
first L - decode tokens of the text (tokenised by llama.cpp itself), then --decode steps
one token at a time (the text's next tokens).  Prints prefill tok/s, median decode ms/token and tok/s, peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def parse_length(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--lengths", default="2k,8k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="load weights without llama.cpp's extra buffer types (AMX / repacked Q4): on the "
                         "Intel AMX KVM guest of this session, llama-cpp-python 0.3.36 segfaults in the "
                         "first decode with them")
    args = ap.parse_args()
    import llama_cpp.llama as llama_mod
    from llama_cpp import Llama, llama_cpp

    if args.no_extra_bufts:
        default_params = llama_cpp.llama_model_default_params

        def params_without_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_mod.llama_cpp.llama_model_default_params = params_without_extra_bufts

    print(f"llama-cpp-python {llama_cpp.__version__ if hasattr(llama_cpp, '__version__') else '?'}; "
          f"system info: {llama_cpp.llama_print_system_info().decode()}")
    with open(args.text, encoding="utf-8") as f:
        text = f.read(8 * 1024 * 1024)
    for length in (parse_length(x) for x in args.lengths.split(",")):
        llm = Llama(model_path=args.gguf, n_ctx=length, n_threads=args.threads, n_threads_batch=args.threads,
                    n_batch=512, verbose=False, logits_all=False)
        # The text is repeated when it is shorter than the length (as `lminf bench --text` does).
        while len(text) < length * 8:
            text += "\n" + text
        all_ids = llm.tokenize(text[: length * 8].encode(), add_bos=True)[:length]
        ids, follow = all_ids[: length - args.decode], all_ids[length - args.decode:]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        pre = time.perf_counter() - t0
        steps = []
        for tok in follow:  # the text's own next tokens (teacher-forced): a step costs the same for any token
            t0 = time.perf_counter()
            llm.eval([tok])
            steps.append(time.perf_counter() - t0)
        med = statistics.median(steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"L={length}: prefill {len(ids)} tokens in {pre:.1f} s ({len(ids) / pre:.0f} tok/s); decode median "
              f"{med * 1e3:.1f} ms/token ({1 / med:.1f} tok/s) [{min(steps) * 1e3:.1f}-{max(steps) * 1e3:.1f}]; "
              f"peak RSS so far {rss:.2f} GiB", flush=True)
        del llm


if __name__ == "__main__":
    main()
