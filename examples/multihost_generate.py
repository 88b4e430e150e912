"""Generate on a mesh spanning every process of a multi-host run.

Every process runs this same program (see launch_multihost.sh): it joins the run
(`ftjax.distributed.initialize`, which reads SLURM / Open MPI / FTJAX_* settings),
builds a mesh over all processes' devices, loads the model sharded on it and
generates. Outputs are host values on every process; process 0 prints them as
one JSON line.

    python examples/multihost_generate.py --tp 8 --prompt "def fib(n):"
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline size (stages across processes: --tp 4 --pp 2 on 2 hosts)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="virtual CPU devices per process (local testing without accelerators)")
    args = p.parse_args()

    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import ftjax
    import ftjax.distributed

    info = ftjax.distributed.initialize()
    mesh = ftjax.make_mesh(tensor=args.tp, data=args.dp, pipe=args.pp)
    model = ftjax.load(args.model or ftjax.demo_model_path(), dtype=args.dtype, mesh=mesh)
    prompts = [[int(t) for t in s.split(",")] for s in args.prompt_ids] or args.prompt
    if not prompts:
        prompts = ["def fibonacci(n):"]
    out = model.generate(prompts, max_new_tokens=args.max_new_tokens,
                         sampling=ftjax.SamplingParams(stop_token_ids=[]))
    if jax.process_index() == 0:
        print(json.dumps({"tokens": out.tokens, "texts": out.texts,
                          "processes": jax.process_count(), "devices": jax.device_count(),
                          "source": info["source"]}), flush=True)


if __name__ == "__main__":
    main()
