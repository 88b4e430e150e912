"""Compare ftjax with HuggingFace transformers on one checkpoint (needs torch).

    python examples/compare_with_hf.py [CHECKPOINT_DIR] [--dtype float32] [--prompt TEXT]

Prints the max abs logit difference on the prompt (teacher forcing) and both greedy
continuations, the way a notebook user would check a converted model.
Default checkpoint: the bundled demo model.
"""

import argparse

import numpy as np
import torch
import transformers

import ftjax


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=ftjax.demo_model_path())
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()

    ours = ftjax.load(args.checkpoint, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=getattr(torch, args.dtype)).eval()
    tok = ours.tokenizer or transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tok.encode(args.prompt)

    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.float().numpy()
    got = np.asarray(ours.forward([ids]))
    print(f"{ours}\nmax |logit ftjax - HF| over {len(ids)} positions: "
          f"{np.abs(got - ref).max():.3g} (logit scale {np.abs(ref).max():.3g})")

    out = ours.generate([ids], max_new_tokens=args.max_new_tokens,
                        sampling=ftjax.SamplingParams(stop_token_ids=[]))
    gen = hf.generation_config
    # Unset fields come from the checkpoint's generation_config.json (the bundled model's
    # has repetition penalty 1.2): greedy decoding of the weights sets them to HF's neutral values.
    gen.update(eos_token_id=None, max_new_tokens=args.max_new_tokens, do_sample=False,
               pad_token_id=0, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
               no_repeat_ngram_size=0)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             generation_config=gen)[0, len(ids):].tolist()
    same = out.tokens[0] == hf_out
    print(f"greedy continuations identical: {same}")
    print("ftjax:", repr(tok.decode(out.tokens[0])))
    if not same:
        print("HF:   ", repr(tok.decode(hf_out)))


if __name__ == "__main__":
    main()
