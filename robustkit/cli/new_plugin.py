"""``robustkit new-plugin NAME [--kind attack|defence|exporter] [--dir DIR]``: a plugin skeleton.

Writes a distribution that installs and passes its tests as written, so that a first plugin
starts from working code: ``pyproject.toml`` with the ``robustkit`` entry point, a package
with the hook and one working example of the kind, and a test that uses ``robustkit.testing``.
The example registers under the plugin's own name (``NAME:NAME``); the user replaces its
body. Templates use ``string.Template`` (``${...}``) so that Python's braces need no escaping.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

import click

from robustkit.errors import RobustkitError

KINDS = ("attack", "defence", "exporter")
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
#: Provider names a plugin may not take: the built-ins' provider and the ``builtin:`` prefix.
_RESERVED = {"robustkit", "builtin"}


@dataclass(frozen=True)
class Names:
    provider: str  #: entry-point and provider name, e.g. ``my-attacks``
    package: str  #: import name, e.g. ``robustkit_my_attacks``
    distribution: str  #: pip name and default folder, e.g. ``robustkit-my-attacks``
    cls: str  #: class of the example, e.g. ``MyAttacks``

    @classmethod
    def parse(cls, name: str) -> Names:
        if not _NAME.match(name):
            raise RobustkitError(
                f"plugin name {name!r} is not valid: use lower-case letters and digits, "
                "optionally joined by '-' or '_', starting with a letter (e.g. my-attacks)"
            )
        if name in _RESERVED or name.startswith(("robustkit-", "robustkit_")):
            raise RobustkitError(
                f"plugin name {name!r} is reserved or repeats the prefix; give the provider "
                "name alone (new-plugin foo writes robustkit-foo)"
            )
        words = re.split(r"[-_]", name)
        return cls(name, "robustkit_" + "_".join(words), "robustkit-" + "-".join(words),
                   "".join(w.capitalize() for w in words))


def render(names: Names, kind: str) -> dict[str, str]:
    """Relative path -> content of every file of the skeleton."""
    if kind not in KINDS:
        raise RobustkitError(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    values = {"provider": names.provider, "package": names.package, "distribution": names.distribution,
              "cls": names.cls, "kind": kind, "plural": PLURALS[kind], **KIND_TEXT[kind]}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{names.package}/__init__.py": INIT,
        f"{names.package}/plugin.py": PLUGIN,
        f"{names.package}/{kind}.py": IMPLEMENTATIONS[kind],
        f"{names.package}/py.typed": "",
        f"tests/test_{names.package}.py": TEST_HEADER + TESTS[kind],
    }
    return {path: Template(text).substitute(values) for path, text in files.items()}


def write_plugin(name: str, kind: str = "attack", directory: Path | None = None) -> tuple[Path, list[Path]]:
    """Write the skeleton into ``directory`` (default ``./robustkit-NAME``), which must be empty."""
    names = Names.parse(name)
    files = render(names, kind)
    root = directory if directory is not None else Path(names.distribution)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise RobustkitError(f"{root} exists and is not empty; choose another --dir or remove it")
    written = []
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return root, written


@click.command("new-plugin")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), default="attack", show_default=True,
              help="What the plugin adds; the skeleton holds one working example of it.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (must be empty or absent) [default: ./robustkit-NAME].")
def new_plugin(name: str, kind: str, directory: Path | None) -> None:
    """Write a ready-to-install plugin package NAME with a working example and a passing test."""
    root, written = write_plugin(name, kind, directory)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: pip install -e {root} && python -m pytest {root}  "
               f"(then `robustkit {PLURALS[kind]} show {name}:{name}`)")


PLURALS = {"attack": "attacks", "defence": "defences", "exporter": "exporters"}

#: What differs between the kinds in the shared templates (imports go in sorted order).
KIND_TEXT = {
    "attack": {"what": "an attack", "example": "random-start FGSM (Wong et al., 2020)", "method": "run()",
               "stdlib_imports": "", "torch_import": "",
               "testing_imports": "check_attack_contract, contract_batch, trained_digits_model"},
    "defence": {"what": "a defence", "example": "a box blur of the inputs", "method": "apply()",
                "stdlib_imports": "", "torch_import": "import torch\n",
                "testing_imports": "check_attack_contract, contract_batch, contract_model"},
    "exporter": {"what": "an exporter", "example": "a torch state dict (.pt) with a JSON sidecar",
                 "method": "export() and load()", "stdlib_imports": "from pathlib import Path\n",
                 "torch_import": "", "testing_imports": "contract_batch, contract_model"},
}

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "${distribution}"
version = "0.1.0"
description = "A robustkit plugin that adds ${what}."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["robustkit"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry-point name is the provider name: robustkit lists this plugin's ${kind} as
# ${provider}:${provider}.
[project.entry-points.robustkit]
${provider} = "${package}.plugin"

[tool.setuptools.packages.find]
include = ["${package}*"]

[tool.setuptools.package-data]
${package} = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]  # the tests also run before the package is installed

[tool.ruff]
line-length = 100

[tool.ruff.lint]
select = ["E", "F", "W", "I", "B", "UP"]
"""

README = """\
# ${distribution}

A robustkit plugin that adds ${what}, `${provider}:${provider}`. It starts as
${example}: replace ${method} in `${package}/${kind}.py` with your own and keep
the tests passing.

```bash
pip install -e .                    # registers the entry point `${provider}`
python -m pytest                    # the contract tests (robustkit.testing)
robustkit plugins                   # ${provider} is listed with status ok
robustkit ${plural} show ${provider}:${provider}
```

Set `ROBUSTKIT_STRICT_PLUGINS=1` while developing: a plugin that fails to load then raises
instead of being listed as failed. See robustkit's `docs/writing-plugins.md` and
`docs/plugin-hooks.md`.
"""

INIT = '''\
"""${distribution}: a robustkit plugin (provider ``${provider}``).

robustkit loads ``${package}.plugin`` through the entry point in pyproject.toml.
"""
'''

PLUGIN = '''\
"""The entry point of the ``${provider}`` provider.

Imports only robustkit's hook marker at module level, so discovering the plugin costs no
torch import; the ${kind} is imported when robustkit asks for its ${plural}.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import robustkit

if TYPE_CHECKING:
    from robustkit import ProviderRegistry


@robustkit.hookimpl
def robustkit_register_${plural}(registry: ProviderRegistry[Any]) -> None:
    from ${package}.${kind} import ${cls}

    registry.add(${cls})  # name, aliases and summary come from the class
'''

ATTACK = '''\
"""The ``${provider}:${provider}`` attack.

Replace ``run`` with your own attack.
``Attack.__call__`` does what every attack needs before and after ``run``: it checks the norm,
puts the model in eval mode (and restores it), passes targets as ``labels`` when the threat
is targeted, projects the result into the eps-ball and the bounds, and judges success.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from robustkit import Attack, Model, Norm, ThreatModel, param
from torch import Tensor


@dataclass(frozen=True)
class ${cls}Params:
    step_factor: float = param(1.25, "gradient step as a multiple of eps (Wong et al. use 1.25)")
    seed: int = param(0, "seed of the random start")

    def __post_init__(self) -> None:
        if self.step_factor <= 0:
            raise ValueError("step_factor must be > 0")


class ${cls}(Attack):
    """Random start in the eps-ball, then one gradient-sign step (RS-FGSM)."""

    name = "${provider}"
    norms = frozenset({Norm.LINF})
    Params = ${cls}Params
    summary = "random start plus one gradient-sign step (RS-FGSM, Wong et al., 2020)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: ${cls}Params = self.params
        generator = torch.Generator(device=x.device).manual_seed(p.seed)
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = threat.project(x, x + threat.eps * (2 * noise - 1)).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(start).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(-loss if threat.targeted else loss, start)
        return start.detach() + p.step_factor * threat.eps * grad.sign()
'''

DEFENCE = '''\
"""The ``${provider}:${provider}`` defence.

Replace ``apply`` with your own defence.
A ``transform`` defence wraps the model; a ``training`` defence returns new weights. Declare
honestly what an audit needs to know: ``masks_gradients`` when the transform hides gradients
(audits then need gradient-free attacks), ``survives_export=False`` when it is not torch code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from robustkit import Dataset, Defence, DefenceResult, RunConfig, ThreatModel, param
from torch import Tensor, nn


@dataclass(frozen=True)
class ${cls}Params:
    size: int = param(3, "side of the averaging window in pixels (odd)")

    def __post_init__(self) -> None:
        if self.size < 1 or self.size % 2 == 0:
            raise ValueError("size must be an odd number >= 1")


class Blurred(nn.Module):
    """``model(box_blur(x))``: a differentiable input transformation."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        blurred = F.avg_pool2d(x, self.size, stride=1, padding=self.size // 2,
                               count_include_pad=False)
        return self.model(blurred)


class ${cls}(Defence):
    """Box-blur the inputs before the model (a placeholder: blurring alone is no defence)."""

    name = "${provider}"
    kind = "transform"
    masks_gradients = False  # the blur is differentiable: gradient attacks see through it
    Params = ${cls}Params
    summary = "box-blur the inputs before the model"

    def apply(self, model: nn.Module, data: Dataset | None, *,
              threat: ThreatModel, run: RunConfig | None = None) -> DefenceResult:
        size = self.params.size
        return DefenceResult(Blurred(model, size),
                             notes=[f"inputs are box-blurred ({size}x{size}) before the model"])
'''

EXPORTER = '''\
"""The ``${provider}:${provider}`` exporter.

Replace ``export`` and ``load`` with your format.
robustkit's export engine calls ``export`` on a model in eval mode, then ``load`` on the
written file, and compares the two on real data (outputs, and PGD examples) before it moves
the files into place: an exporter that loses anything fails its export, not its deployment.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from robustkit import Exporter, ExportResult, Model
from torch import Tensor, nn


class ${cls}(Exporter):
    """A torch state dict (``.pt``) and the robustness metadata as JSON beside it."""

    name = "${provider}"
    suffix = ".pt"
    summary = "torch state dict (.pt) plus a JSON file with the robustness metadata"

    def export(self, model: nn.Module, example: Tensor, path: Path, *,
               metadata: dict[str, Any]) -> ExportResult:
        torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, path)
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps(metadata, indent=2, default=str) + "\\n")
        return ExportResult(path, self.name, [path, sidecar])

    def load(self, path: Path, model: nn.Module) -> Model:
        restored = copy.deepcopy(model)  # a state dict holds weights only: rebuild, then fill
        restored.load_state_dict(torch.load(path, weights_only=True))  # never unpickles code
        return restored.eval()
'''

TEST_HEADER = '''\
"""Tests of the ``${provider}`` plugin, with robustkit's contract helpers."""
from __future__ import annotations

from collections.abc import Iterator
${stdlib_imports}
import pytest
${torch_import}from robustkit import ThreatModel
from robustkit.plugin.host import Host, set_host
from robustkit.testing import ${testing_imports}

from ${package} import plugin
from ${package}.${kind} import ${cls}


@pytest.fixture
def host() -> Iterator[Host]:
    """robustkit's built-ins and this plugin only, as the process-wide host."""
    host = Host(entry_points=False)
    record = host.register(plugin, "${provider}")
    assert record.ok, record.status
    set_host(host)
    yield host
    set_host(None)


def test_registered_under_the_provider_name(host: Host) -> None:
    assert host.${plural}.resolve("${provider}:${provider}").obj is ${cls}
'''

TESTS = {
    "attack": '''

def test_attack_contract() -> None:
    check_attack_contract(${cls}())  # stays in the ball and bounds, restores modes, ...


def test_attack_lowers_accuracy(host: Host) -> None:
    model = trained_digits_model("cnn", epochs=3)  # trains in seconds, cached per process
    x, y = contract_batch(128)
    clean = float((model(x).argmax(1) == y).float().mean())
    result = ${cls}()(model, x, y, threat=ThreatModel.parse("linf:0.15"))
    assert result.robust_accuracy < clean
''',
    "defence": '''

def test_defended_model_predicts_and_keeps_gradients(host: Host) -> None:
    model = contract_model()
    defended = ${cls}().apply(model, None, threat=ThreatModel.parse("linf:0.1")).model
    x, _ = contract_batch()
    x.requires_grad_(True)
    logits = defended.eval()(x)
    assert logits.shape == (len(x), 10) and bool(torch.isfinite(logits).all())
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert bool(grad.abs().sum() > 0), "masks_gradients = False, but the gradient is zero"


def test_attacks_keep_their_contract_on_the_defended_model(host: Host) -> None:
    threat = ThreatModel.parse("linf:0.1")
    defended = ${cls}().apply(contract_model(), None, threat=threat).model
    pgd = host.attacks.resolve("robustkit:pgd").obj
    check_attack_contract(pgd(steps=3), model=defended)
''',
    "exporter": '''

def test_export_is_verified_by_the_engine(host: Host, tmp_path: Path) -> None:
    from robustkit.export.run import export_model

    x, y = contract_batch(64)
    path = tmp_path / "model.pt"
    result = export_model(contract_model(), ${cls}(), path, x=x, y=y,
                          threat=ThreatModel.parse("linf:0.1"), metadata={"note": "test"})
    assert result.verified and result.path == path and path.exists()
    assert result.checks["argmax_agreement"] == 1.0
    assert all(file.exists() for file in result.files)
''',
}

IMPLEMENTATIONS = {"attack": ATTACK, "defence": DEFENCE, "exporter": EXPORTER}
