"""Wanda pruning of a transformers language model with memcore's ops (Sun et al., ICLR 2024).

For each decoder layer in turn, the calibration batch runs through the model (already pruned up to
that layer, as Wanda does), memcore's ``sqnorm_accumulate`` sums the squares of every Linear's
input per feature, and ``prune_mask`` picks each Linear's weights to remove: the lowest
``|W| * ||x||`` per output row, unstructured (``--sparsity``) or n:m (``--nm 2:4``, for sparse
tensor cores).

    python examples/wanda_prune.py                                   # a tiny random Llama, in seconds
    python examples/wanda_prune.py --nm 2:4
    python examples/wanda_prune.py --model path/to/llama --text calibration.txt --device cuda

A random model's loss means nothing; with ``--model`` (a local folder: nothing is downloaded) and
``--text`` (calibration text, Wanda uses 128 sequences of C4) it is the real method.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from memcore.ops import prune_mask, sqnorm_accumulate


def tiny_llama():
    """A random 2-layer Llama (no download), and random calibration tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(1))
    return model, tokens


def decoder_layers(model) -> list[torch.nn.Module]:
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        node = model
        try:
            for name in path.split("."):
                node = getattr(node, name)
        except AttributeError:
            continue
        return list(node)
    raise SystemExit(f"no decoder layers found in {type(model).__name__}")


@torch.no_grad()
def loss(model, tokens: torch.Tensor) -> float:
    return float(model(tokens, labels=tokens).loss)


@torch.no_grad()
def wanda(model, tokens: torch.Tensor, sparsity: float | None = None, n: int = 0, m: int = 0) -> dict[str, float]:
    """Prune every Linear of every decoder layer in place; the pruned fraction per Linear."""
    pruned = {}
    for index, layer in enumerate(decoder_layers(model)):
        linears = {name: module for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
        sums = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device) for name, lin in linears.items()}

        def hook(name):
            def record(module, args):
                sqnorm_accumulate(args[0].detach(), sums[name], token_norm=False)

            return record

        handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
        try:
            model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        for name, lin in linears.items():
            mask = prune_mask(lin.weight, sums[name], sparsity, n=n, m=m, squared=True)
            lin.weight[mask] = 0
            pruned[f"layers.{index}.{name}"] = float(mask.float().mean())
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local transformers causal LM folder (default: a tiny random Llama)")
    parser.add_argument("--text", type=Path, help="calibration text (with --model)")
    parser.add_argument("--sequences", type=int, default=128, help="calibration sequences (with --text)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence (with --text)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row to prune (default 0.5)")
    parser.add_argument("--nm", help="n:m structured sparsity instead, e.g. 2:4")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args.text is None:
            parser.error("--text: calibration text is required with --model")
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        ids = AutoTokenizer.from_pretrained(args.model, local_files_only=True)(args.text.read_text())["input_ids"]
        count = min(args.sequences, len(ids) // args.length)
        if count < 1:
            parser.error(f"--text: {len(ids)} tokens, fewer than one sequence of --length {args.length}")
        tokens = torch.tensor(ids[: count * args.length]).reshape(count, args.length)
    else:
        model, tokens = tiny_llama()
    model, tokens = model.to(args.device), tokens.to(args.device)
    n, m = (int(v) for v in args.nm.split(":")) if args.nm else (0, 0)
    before = loss(model, tokens)
    pruned = wanda(model, tokens, None if args.nm else args.sparsity, n=n, m=m)
    after = loss(model, tokens)
    print(f"pruned {len(pruned)} Linear layers, {min(pruned.values()):.3f}-{max(pruned.values()):.3f} of each "
          f"({args.nm or args.sparsity}); calibration loss {before:.4f} -> {after:.4f} "
          f"(perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")


if __name__ == "__main__":
    main()
