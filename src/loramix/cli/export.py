"""`loramix export`: an adapter as a GGUF LoRA for llama.cpp, or merged into its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import PickleOpt, out, styled

export_app = typer.Typer(help="Export an adapter for llama.cpp (GGUF) or as a merged model.", no_args_is_help=True)


@export_app.command("gguf")
def export_gguf_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter folder."),
    out_file: Path = typer.Option(..., "--out", "-o", help="GGUF file to write."),
    base: Optional[str] = typer.Option(None, help="Base model whose config.json to read (default: the adapter's own)."),
    dtype: str = typer.Option("f32", help="Tensor type: f32 or f16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_pickle: PickleOpt = False,
) -> None:
    """Write ADAPTER as a GGUF LoRA adapter for llama.cpp (llama-cli --lora FILE) and Ollama (ADAPTER FILE)."""
    from ..export import export_gguf

    path = export_gguf(adapter, out_file, base=base, dtype=dtype, allow_pickle=allow_pickle, force=force)
    out.print(styled("wrote ", (str(path), "bold"), f" ({path.stat().st_size / 2**20:.1f} MiB)"))


@export_app.command("merged")
def export_merged_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the merged model to."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's own)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Merge ADAPTER into its base model and save a safetensors model that transformers loads without PEFT."""
    from ..export import export_merged

    out.print(styled("wrote ", (str(export_merged(adapter, out_dir, base=base, force=force)), "bold")))
