"""The public API of encoders/: what `__all__` promises, and README's example that uses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import encoders
from encoders.positions import list_position_encodings

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(heading: str) -> str:
    """The first python code block after ``heading`` in README.md."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_public_name_is_importable_from_the_package() -> None:
    assert len(set(encoders.__all__)) == len(encoders.__all__)
    for name in encoders.__all__:
        assert getattr(encoders, name) is not None, name
    assert "cope_attention" in encoders.__all__ and "EncoderConfig" in encoders.__all__


def test_readme_example_puts_cope_inside_a_foreign_attention_block() -> None:
    namespace: dict = {}
    exec(readme_example("### CoPE inside your own attention block"), namespace)
    block = namespace["MyAttention"](dim=32, heads=4, npos=8)
    x = torch.randn(2, 10, 32)
    out = block(x)
    assert out.shape == x.shape
    # With the zero-initialised table, CoPE is exactly causal softmax attention.
    q, k, v = block.qkv(x).unflatten(-1, (3, 4, -1)).permute(2, 0, 3, 1, 4)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, block.out(plain.transpose(1, 2).flatten(2)))
    out.sum().backward()
    assert block.positions.grad is not None and block.positions.grad.abs().sum() > 0


def test_readme_module_table_lists_exactly_the_modules_of_the_tree() -> None:
    root = README.parent
    text = README.read_text()
    table = text[text.index("## Code layout") : text.index("## The encoder library")]
    listed = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.M):
        names = re.findall(r"`([^`]+)`", cell)
        folder = names[0].rsplit("/", 1)[0]
        listed |= {names[0]} | {f"{folder}/{name}" for name in names[1:]}
    modules = {
        path.relative_to(root).as_posix()
        for package in ("encoders", "recipes", "cope_cli")
        for path in (root / package).rglob("*.py")
        if path.name != "__init__.py" or package == "encoders"
    }
    assert not listed - modules, f"README lists modules that do not exist: {listed - modules}"
    assert not modules - listed, f"README's module table lacks: {sorted(modules - listed)}"


def test_names_module_matches_the_registries() -> None:
    """encoders.names lets the CLI list names without torch; it must say what the registries say."""
    from encoders import names
    from encoders.cope_core import GATES

    assert set(names.POSITION_ENCODINGS) == set(list_position_encodings())
    assert names.GATES == GATES


def test_public_names_resolve_lazily_to_their_modules() -> None:
    from encoders import cope

    assert encoders.cope_attention is cope.cope_attention
    assert set(encoders.__all__) <= set(dir(encoders))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        encoders.nothing  # noqa: B018
