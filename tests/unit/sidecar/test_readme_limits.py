"""The README's HTTP/2 limits table lists every ``h2_*`` limit with its flag and its default."""

from __future__ import annotations

import re

from sidecar.limits import described, flag_name
from tests.support import REPO


def test_every_h2_limit_is_in_the_readme_table_with_its_default() -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- BEGIN limits-h2 -->(.*?)<!-- END limits-h2 -->", text, re.S)
    assert block, "README.md has no limits-h2 block"
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--[a-z0-9-]+)` \| ([^|]+) \|", block.group(1), re.M)}
    h2 = [(name, default) for name, _, default, _ in described() if name.startswith("h2_")]
    assert h2
    for name, default in h2:
        flag = flag_name(name)
        assert flag in rows, f"{flag} is missing from the README's HTTP/2 limits table"
        assert rows[flag].split()[0] == str(default), f"{flag}: README says {rows[flag]!r}, default is {default}"
    assert set(rows) == {flag_name(n) for n, _ in h2}, "the table lists a flag that is not an h2 limit"
