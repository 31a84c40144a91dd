"""Trained gate files: ``gate.safetensors`` + ``gate.json`` naming the base model, shared by every gate kind.

A gate class (an ``nn.Module`` built from its ``meta`` dict) mixes in :class:`GateFile` and sets ``LABEL``,
``FORMAT``, ``REQUIRED`` (meta fields a valid file must have), ``TRAIN_KIND`` (the ``kvaccel train-gate`` kind) and,
for gates shipped in the package, ``DATA_DIR`` and ``SHIPPED_PREFIX``.
No pickle: weights are safetensors, the config is JSON. Every failure is a ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from kvaccel.models import text_config  # noqa: F401  (re-exported: the gates read their shapes through it)

WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate.json"


class GateFile:
    """Save / load / model check for a gate ``nn.Module`` whose constructor takes its ``meta`` dict."""

    LABEL: ClassVar[str] = "gate"
    FORMAT: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ("model_name", "model_fingerprint")
    TRAIN_KIND: ClassVar[str] = ""
    DATA_DIR: ClassVar[Path | None] = None  # the package folder holding the shipped gates of this kind
    SHIPPED_PREFIX: ClassVar[str] = ""  # a shipped gate's folder: DATA_DIR / f"{SHIPPED_PREFIX}_{model name}"
    meta: dict

    @classmethod
    def shipped_dir(cls, model_name: str) -> Path:
        """Where the package keeps the trained gate of this kind for a model (it may not exist)."""
        if cls.DATA_DIR is None:
            raise ValueError(f"no {cls.LABEL} ships with the package; train one with `kvaccel train-gate "
                             f"{cls.TRAIN_KIND} --model ... --out DIR`")
        return cls.DATA_DIR / f"{cls.SHIPPED_PREFIX}_{model_name}"

    @classmethod
    def trained_for(cls, model, path: str | Path | None, method: str, option: str = "weights", hint: str = ""):
        """The gate ``method`` runs ``model`` with: loaded from ``path`` when given, else the one shipped for the model,
        checked against the model (:meth:`check_model`). ``ValueError`` naming the training command when nothing
        ships for the model; ``hint`` is appended to that message."""
        from kvaccel.models import model_name

        if path is not None:
            where = Path(path)
        else:
            where = cls.shipped_dir(model_name(model))
            if not (where / WEIGHTS_FILE).is_file():
                raise ValueError(
                    f"{method}: nothing trained ships for model '{model_name(model)}' (no {cls.LABEL} in {where}); "
                    f"train one with `kvaccel train-gate {cls.TRAIN_KIND} --model ... --out DIR` and pass "
                    f"{option}=DIR{hint}"
                )
        gate = cls.load(where)
        gate.check_model(model, where)
        return gate

    def check_model(self, model, where: str | Path = "gate") -> None:
        """``ValueError`` naming both models when this gate was trained for another model."""
        from kvaccel.models import model_fingerprint, model_name

        name, fp = model_name(model), model_fingerprint(model)
        if fp != self.meta.get("model_fingerprint"):
            raise ValueError(
                f"{self.LABEL} {where} was trained for model '{self.meta.get('model_name')}' (fingerprint "
                f"{self.meta.get('model_fingerprint')}), not for '{name}' (fingerprint {fp}); train one for this model "
                f"with `kvaccel train-gate {self.TRAIN_KIND} --model ... --out DIR` and pass weights=DIR"
            )

    def save(self, out: str | Path) -> Path:
        """Write ``gate.safetensors`` + ``gate.json`` into directory ``out`` (created); returns it."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": self.FORMAT})
        (out / CONFIG_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None):
        """Load a directory written by :meth:`save` (or the path of its ``gate.safetensors``).

        Missing, corrupted or truncated files raise ``ValueError`` naming the file, never an error deep in torch.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        folder = path.parent if path.suffix == ".safetensors" else path
        cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise ValueError(f"{cls.LABEL} file {f} does not exist (a gate is {WEIGHTS_FILE} + {CONFIG_FILE})")
        try:
            meta = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cls.LABEL} config {cfg_file} is not valid JSON ({e}); re-save or retrain") from None
        meta = meta if isinstance(meta, dict) else {}
        missing = [k for k in cls.REQUIRED if k not in meta]
        if missing or meta.get("format") != cls.FORMAT:
            raise ValueError(
                f"{cls.LABEL} config {cfg_file} is not a {cls.FORMAT} file (format {meta.get('format')!r}, "
                f"missing fields {missing})"
            )
        try:
            tensors = load_file(str(w_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"{cls.LABEL} weights {w_file} are corrupted or truncated ({e}); re-save or retrain the gate"
            ) from None
        gate = cls(meta)
        expected = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
            raise ValueError(f"{cls.LABEL} weights {w_file} do not match its config {cfg_file}: {diff}")
        gate.load_state_dict(tensors)
        return gate.to(device) if device is not None else gate
