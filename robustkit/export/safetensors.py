"""The built-in ``safetensors`` exporter: the weights, and a small JSON model card beside them.

For users who deploy with torch. A ``Normalized`` model is saved without its wrapper and the
card records mean and std, so ``--arch A --mean M --std S`` loads the file back exactly as
robustkit loaded the original (the card says so in its ``load`` line). Verification loads the
file into a copy of the model, so a missing or extra tensor fails the export.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from robustkit.errors import RobustkitError
from robustkit.export.run import METADATA_KEY, Exporter, ExportResult
from robustkit.models.base import INPUT_METADATA_KEY, file_sha256, input_metadata
from robustkit.models.loading import load_state_dict_strict
from robustkit.modules import Model, Normalized


def _unwrap(model: nn.Module) -> tuple[nn.Module, dict[str, list[float]] | None]:
    """The network whose weights are saved, and the normalisation that wraps it (if any)."""
    if isinstance(model, Normalized):
        return model.net, {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    return model, None


def _load_command(path: Path, arch: str | None, normalisation: dict[str, list[float]] | None) -> str:
    command = f"robustkit audit {path.name} --arch {arch or 'MODULE:FACTORY'}"
    if normalisation is not None:
        command += " " + " ".join(f"--{k} {','.join(f'{v:g}' for v in values)}" for k, values in normalisation.items())
    return command


class SafetensorsExporter(Exporter):
    """Weights as safetensors (no code runs on load) plus a JSON model card."""

    name = "safetensors"
    suffix = ".safetensors"
    summary = "safetensors weights and a JSON model card (NAME.json) for torch deployments"

    def export(self, model: nn.Module, example: Tensor, path: Path, *, metadata: dict[str, Any]) -> ExportResult:
        from safetensors.torch import save_file

        net, normalisation = _unwrap(model)
        state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
        try:
            declared = (tuple(normalisation["mean"]), tuple(normalisation["std"])) if normalisation else None
            shape = metadata.get("input", {})
            save_file(state, str(path), metadata={
                METADATA_KEY: json.dumps(metadata, default=str),
                INPUT_METADATA_KEY: input_metadata(declared, tuple(shape.get("bounds", (0.0, 1.0))),
                                                   tuple(shape.get("shape", ())), None),
            })
        except RuntimeError as err:  # tensors that share memory (tied weights)
            raise RobustkitError(f"safetensors cannot store these weights: {str(err).splitlines()[0]}") from None
        card = path.with_suffix(".json")
        arch = metadata.get("source", {}).get("arch")
        card.write_text(json.dumps({
            "weights": path.name, "sha256": file_sha256(path), "tensors": len(state),
            "normalisation": normalisation, "load": _load_command(path, arch, normalisation), **metadata,
        }, indent=2, default=str) + "\n")
        return ExportResult(path, "safetensors", [path, card], details={"tensors": len(state), "card": card.name})

    def wrote(self, path: Path) -> bool:
        """Our weights carry robustkit's metadata; our model card names them and says how to load."""
        try:
            if path.suffix == ".json":
                card = json.loads(path.read_text())
                return isinstance(card, dict) and {"weights", "load", "format_version"} <= set(card)
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return METADATA_KEY in (handle.metadata() or {})
        except Exception:  # unreadable or another format: not ours
            return False

    def load(self, path: Path, model: nn.Module) -> Model:
        from safetensors.torch import load_file

        restored = copy.deepcopy(model)
        net, _ = _unwrap(restored)
        load_state_dict_strict(net, load_file(str(path)), path.name, "the exported architecture")
        return restored.eval()
