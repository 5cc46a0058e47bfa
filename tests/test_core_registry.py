"""Name resolution: exact ``provider:name``, bare names, aliases, wildcards, clashes, typos."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from robustkit.errors import DuplicateNameError, RobustkitError, UnknownNameError
from robustkit.plugin.host import Host
from robustkit.plugin.registry import ProviderRegistry, Registry


@pytest.fixture
def registry() -> Registry[str]:
    """robustkit:pgd, robustkit:fgsm (alias fgm), art:pgd, art:deepfool, ta:deepfool, ta:cw."""
    reg: Registry[str] = Registry("attack", "attacks")
    reg.add("robustkit", "pgd", "native-pgd", aliases=("madry",))
    reg.add("robustkit", "fgsm", "native-fgsm", aliases=("fgm",))
    reg.add("art", "pgd", "art-pgd", plugin="robustkit-art")
    reg.add("art", "deepfool", "art-deepfool", plugin="robustkit-art")
    reg.add("ta", "deepfool", "ta-deepfool", plugin="robustkit-torchattacks")
    reg.add("ta", "cw", "ta-cw", plugin="robustkit-torchattacks", aliases=("carlini",))
    return reg


def test_exact_provider_name_wins_over_builtin(registry: Registry[str]) -> None:
    assert registry.resolve("art:pgd").obj == "art-pgd"
    assert registry.resolve("robustkit:pgd").obj == "native-pgd"
    assert registry.resolve("ART:PGD").obj == "art-pgd"  # names are case-insensitive


def test_bare_name_means_builtin_then_unique_provider(registry: Registry[str]) -> None:
    assert registry.resolve("pgd").obj == "native-pgd"
    assert registry.resolve("cw").obj == "ta-cw"


def test_bare_name_with_several_providers_is_ambiguous(registry: Registry[str]) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("deepfool")
    message = str(info.value)
    assert "ambiguous" in message
    assert "art:deepfool" in message and "ta:deepfool" in message
    assert "\n" not in message


def test_aliases_resolve_like_names(registry: Registry[str]) -> None:
    assert registry.resolve("fgm").obj == "native-fgsm"
    assert registry.resolve("robustkit:madry").obj == "native-pgd"
    assert registry.resolve("carlini").obj == "ta-cw"
    assert registry.resolve("ta:carlini").obj == "ta-cw"
    with pytest.raises(UnknownNameError):
        registry.resolve("art:carlini")  # an alias belongs to its provider


def test_wildcard_list_and_natural_sort() -> None:
    reg: Registry[str] = Registry("attack", "attacks")
    for name in ("pgd10", "pgd2", "fgsm", "pgd1"):
        reg.add("art", name, name)
    reg.add("zz", "pgd3", "zz")
    reg.add("robustkit", "pgd", "native")
    assert [e.qualified_name for e in reg.list("art:*")] == [
        "art:fgsm",
        "art:pgd1",
        "art:pgd2",
        "art:pgd10",
    ]
    # built-ins first, then providers and names in natural order
    assert [e.qualified_name for e in reg.list("pgd*")] == [
        "robustkit:pgd",
        "art:pgd1",
        "art:pgd2",
        "art:pgd10",
        "zz:pgd3",
    ]
    assert len(reg.list()) == len(reg) == 6
    assert reg.list("nothing*") == []


def test_list_matches_aliases(registry: Registry[str]) -> None:
    assert [e.qualified_name for e in registry.list("carl*")] == ["ta:cw"]


@pytest.mark.parametrize("label", ["pgd", "madry"])
def test_registering_a_name_twice_names_both_plugins(registry: Registry[str], label: str) -> None:
    with pytest.raises(DuplicateNameError) as info:
        registry.add("robustkit", label, "again", plugin="my-plugin")
    message = str(info.value)
    assert f"robustkit:{label}" in message
    assert "'robustkit'" in message and "'my-plugin'" in message


def test_alias_clashing_with_a_name_is_a_duplicate(registry: Registry[str]) -> None:
    with pytest.raises(DuplicateNameError, match="robustkit-art"):
        registry.add("art", "other", "x", plugin="third", aliases=("deepfool",))


def test_invalid_names_are_refused(registry: Registry[str]) -> None:
    with pytest.raises(RobustkitError, match="not valid"):
        registry.add("art", "Has Space", "x")


def test_unknown_name_suggests_close_matches_and_the_list_command(registry: Registry[str]) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("pgdd")
    message = str(info.value)
    assert "did you mean" in message and "pgd" in message
    assert "robustkit attacks list" in message
    with pytest.raises(UnknownNameError, match="deepfool"):
        registry.resolve("art:deepfoo")
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "robustkit attacks list" in str(info.value)


def test_remove_plugin_drops_its_names_and_aliases(registry: Registry[str]) -> None:
    registry.remove_plugin("robustkit-torchattacks")
    assert [e.qualified_name for e in registry.list("ta:*")] == []
    with pytest.raises(UnknownNameError):
        registry.resolve("carlini")
    assert registry.resolve("deepfool").obj == "art-deepfool"  # no longer ambiguous


def test_provider_registry_takes_name_and_summary_from_the_object() -> None:
    class Thing:
        """First line of the doc.

        More text."""

        name = "thing"
        aliases = ("t",)

    reg: Registry[type] = Registry("attack", "attacks")
    entry = ProviderRegistry(reg, "mine", "mine-plugin").add(Thing)
    assert (entry.qualified_name, entry.aliases, entry.summary, entry.plugin) == (
        "mine:thing",
        ("t",),
        "First line of the doc.",
        "mine-plugin",
    )


def test_host_registry_charges_a_clash_to_the_second_plugin(
    host: Host, make_attack: Callable[..., type], register_attacks: Callable[..., object]
) -> None:
    register_attacks("first", make_attack("zap"), provider="shared")
    register_attacks("second", make_attack("zap"), provider="shared")
    statuses = {r.name: r.status for r in host.plugins()}
    assert statuses["first"] == "ok"
    assert statuses["second"].startswith("failed: DuplicateNameError")
    assert "'first'" in statuses["second"] and "'second'" in statuses["second"]
    assert host.attacks.resolve("zap").plugin == "first"
    assert host.attacks.resolve("pgd").qualified_name == "robustkit:pgd"
