"""docs/architecture.md's tables must say what the code has, both ways.

Read from the sources (no compiler, no root, no bcc):
  - maps: every map-declaring bcc macro in bpf/ (BPF_TABLE*, BPF_HASH, BPF_ARRAY,
    BPF_PERCPU_ARRAY, BPF_RINGBUF_OUTPUT, BPF_PERF_OUTPUT, ...), including those inside a
    #define that is expanded per slot (BH_SLOT_MAPS(0), BH_SLOT_MAPS(1)). The map table must
    name each one, with its type, the bh_* structs of its key and value, its size constant,
    and whether it is pinned;
  - programs: the program names the loader knows (agent/datapath/loader.py: *_PROG and
    TAIL_PROGS) and every entry function of bpf/bulkhead.c. The program table must name each
    one, with its hook: `XDP`, `TC`, `tail slot N` as the loader wires it;
  - rooms: every room of agent/ with its modules, and what it may import (the rule
    tests/unit/test_layout.py enforces);
  - headers: every file of bpf/include/.
A row missing or stale (naming what the code no longer has) fails with its name.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from bulkhead.datapath import loader

ROOT = Path(__file__).resolve().parents[2]
BPF = ROOT / "bpf"
DOC = ROOT / "docs" / "architecture.md"

# bcc map macros -> (kernel map type, argument layout). Layout names the positional
# arguments; the name always comes from "name". Key and value default as bcc does.
NAME_FIRST = {
    "BPF_HASH": ("hash", ("name", "key", "value", "size")),
    "BPF_LRU_HASH": ("lru_hash", ("name", "key", "value", "size")),
    "BPF_PERCPU_HASH": ("percpu_hash", ("name", "key", "value", "size")),
    "BPF_LPM_TRIE": ("lpm_trie", ("name", "key", "value", "size")),
    "BPF_ARRAY": ("array", ("name", "value", "size")),
    "BPF_PERCPU_ARRAY": ("percpu_array", ("name", "value", "size")),
    "BPF_HISTOGRAM": ("hash", ("name", "key", "size")),
    "BPF_PROG_ARRAY": ("prog_array", ("name", "size")),
    "BPF_DEVMAP": ("devmap", ("name", "size")),
    "BPF_CPUMAP": ("cpumap", ("name", "size")),
    "BPF_XSKMAP": ("xskmap", ("name", "size")),
    "BPF_SOCKMAP": ("sockmap", ("name", "size")),
    "BPF_SOCKHASH": ("sockhash", ("name", "key", "size")),
    "BPF_QUEUE": ("queue", ("name", "value", "size")),
    "BPF_STACK": ("stack", ("name", "value", "size")),
    "BPF_STACK_TRACE": ("stack_trace", ("name", "size")),
    "BPF_PERF_ARRAY": ("perf_event_array", ("name", "size")),
    "BPF_PERF_OUTPUT": ("perf_event_array", ("name",)),
    "BPF_RINGBUF_OUTPUT": ("ringbuf", ("name", "size")),
}
# BPF_TABLE(type, key, value, name, size[, ...]) and its variants
TABLE_MACROS = {"BPF_TABLE", "BPF_TABLE_PINNED", "BPF_TABLE_PUBLIC", "BPF_TABLE_SHARED"}
# bcc's table type strings that differ from the kernel's BPF_MAP_TYPE_* name (what bpftool shows)
BCC_TYPE = {"prog": "prog_array", "perf_output": "perf_event_array", "extern": "extern"}
# Not map declarations, though they start a line with BPF_...(
NOT_MAPS = {"BPF_F_NO_PREALLOC"}
# What the type column may say (kernel BPF_MAP_TYPE_* names, lower case)
MAP_TYPES = {t for t, _ in NAME_FIRST.values()} | {"array", "hash", "lru_hash", "lpm_trie", "percpu_array",
                                                   "percpu_hash", "lru_percpu_hash", "array_of_maps",
                                                   "hash_of_maps", "sk_storage", "cgroup_storage"}


# ---------------------------------------------------------------------------- the C side


def _c_text(path: Path) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return text.replace("\\\n", " ")  # a #define continued over lines becomes one line


def _args(text: str, start: int) -> tuple[list[str], int]:
    """Top-level comma-separated arguments of the call whose '(' is at text[start]."""
    depth, args, cur, i = 0, [], "", start
    while True:
        ch = text[i]
        if ch == "(":
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(cur.strip())
                return [a for a in args if a], i
        elif ch == "," and depth == 1:
            args.append(cur.strip())
            cur = ""
            i += 1
            continue
        cur += ch
        i += 1


def _bh_structs(c_type: str) -> set[str]:
    """bh_* structs named in a C type or a table cell (`enum bh_reason` is an index, not a struct)."""
    return set(re.findall(r"(?<!enum )\bbh_\w+", c_type))


def c_structs() -> set[str]:
    return set(re.findall(r"\bstruct\s+(bh_\w+)\s*\{", _c_text(BPF / "include" / "types.h")))


def _declarations(text: str, where: str) -> list[dict]:
    found = []
    for m in re.finditer(r"\b(BPF_[A-Z0-9_]+)\s*\(", text):
        macro = m.group(1)
        if macro not in NAME_FIRST and macro not in TABLE_MACROS:
            continue
        args, _ = _args(text, m.end() - 1)
        if macro in TABLE_MACROS:
            kind = args[0].strip('"')
            d = {"type": BCC_TYPE.get(kind, kind), "key": args[1], "value": args[2], "name": args[3],
                 "size": args[4], "pinned": macro == "BPF_TABLE_PINNED"}
        else:
            kind, layout = NAME_FIRST[macro]
            d = {"type": kind, "key": "", "value": "", "size": "", "pinned": False}
            d.update(zip(layout, args))
        d["where"] = where
        found.append(d)
    return found


def c_maps() -> dict[str, dict]:
    """map name -> {types, structs, sizes, pinned, where}, from every .c and .h under bpf/."""
    decls: list[dict] = []
    unknown = []
    for path in sorted(BPF.rglob("*.[ch]")):
        where = str(path.relative_to(ROOT))
        text = _c_text(path)
        # Macros that declare maps from a parameter (name##n): expand each use.
        templates = {}
        plain = []
        for line in text.splitlines():
            d = re.match(r"\s*#\s*define\s+(\w+)\(([^)]*)\)(.*)", line)
            if d and re.search(r"\bBPF_[A-Z0-9_]+\s*\(", d.group(3)):
                templates[d.group(1)] = ([p.strip() for p in d.group(2).split(",")], d.group(3))
                continue
            plain.append(line)
        body = "\n".join(plain)
        for name, (params, tmpl) in templates.items():
            for m in re.finditer(rf"^\s*{name}\s*\(", body, flags=re.M):
                args, _ = _args(body, m.end() - 1)
                expanded = tmpl
                for p, a in zip(params, args):
                    expanded = re.sub(rf"\s*##\s*{p}\b", a, expanded)
                decls += _declarations(expanded, where)
        decls += _declarations(body, where)
        for m in re.finditer(r"^(BPF_[A-Z0-9_]+)\s*\(", body, flags=re.M):
            if m.group(1) not in NAME_FIRST and m.group(1) not in TABLE_MACROS and m.group(1) not in NOT_MAPS:
                unknown.append(f"{where}: {m.group(1)}")
    assert not unknown, f"map macros this test does not know (teach it their argument layout): {unknown}"
    maps: dict[str, dict] = {}
    for d in decls:
        e = maps.setdefault(d["name"], {"types": set(), "structs": set(), "sizes": set(), "pinned": set(),
                                         "where": d["where"]})
        e["types"].add(d["type"])  # one name, several types: a build option picks one
        e["structs"] |= _bh_structs(d["key"]) | _bh_structs(d["value"])
        if d["size"]:
            e["sizes"].add(d["size"])
        e["pinned"].add(d["pinned"])
    return maps


def c_programs() -> dict[str, str]:
    """entry function -> its context struct (xdp_md, __sk_buff), from bpf/bulkhead.c."""
    text = _c_text(BPF / "bulkhead.c")
    return dict(re.findall(r"^int\s+(\w+)\s*\(\s*struct\s+(\w+)\s*\*\s*\w+\s*\)", text, flags=re.M))


def loader_programs() -> dict[str, set[int]]:
    """program name -> tail slots the loader puts it in (empty: attached or loaded only)."""
    progs = {v: set() for k, v in vars(loader).items() if k.endswith("_PROG") and isinstance(v, str)}
    for slot, name in loader.TAIL_PROGS.items():
        progs.setdefault(name, set()).add(int(slot))
    return progs


# ---------------------------------------------------------------------------- the doc side


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def doc_table(first_header: str, text: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The one table of architecture.md whose first header cell is `first_header`."""
    lines = (DOC.read_text() if text is None else text).splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*-", lines[i + 1]):
            head = [c.lower() for c in _cells(line)]
            if head[0] == first_header:
                rows = []
                for r in lines[i + 2:]:
                    if not r.startswith("|"):
                        break
                    rows.append(_cells(r))
                tables.append((head, rows))
    assert len(tables) == 1, f"docs/architecture.md: expected one table headed '{first_header}', found {len(tables)}"
    return tables[0]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _expand(name: str) -> list[str]:
    """`seg_map_{0,1}` -> seg_map_0, seg_map_1."""
    m = re.search(r"\{([^}]*)\}", name)
    if not m:
        return [name]
    return [x for alt in m.group(1).split(",") for x in _expand(name[:m.start()] + alt.strip() + name[m.end():])]


def doc_rows(first_header: str, text: str | None = None) -> dict[str, dict[str, str]]:
    """name in the first column -> {header: cell}; a cell may name several (`a` / `b_{0,1}`)."""
    head, rows = doc_table(first_header, text)
    out = {}
    for row in rows:
        for ticked in _ticked(row[0]) or [row[0]]:
            for name in _expand(ticked):
                out[name] = dict(zip(head, row))
    return out


# ---------------------------------------------------------------------------- the checks


def map_problems(maps: dict[str, dict], rows: dict[str, dict[str, str]]) -> list[str]:
    bad = [f"map {n} ({maps[n]['where']}) is missing from the map table" for n in sorted(maps.keys() - rows.keys())]
    bad += [f"map {n} is in the map table but declared nowhere in bpf/" for n in sorted(rows.keys() - maps.keys())]
    structs_now = c_structs()
    for name in sorted(maps.keys() & rows.keys()):
        c, row = maps[name], rows[name]
        types = set(_ticked(row["type"])) & MAP_TYPES
        if types != c["types"]:
            bad.append(f"map {name}: type {sorted(types)} in the table, {sorted(c['types'])} in the C")
        said = _bh_structs(row["key -> value"])
        if c["structs"] - said:
            bad.append(f"map {name}: key -> value should name {sorted(c['structs'] - said)} (the C declares it so)")
        if said - structs_now:
            bad.append(f"map {name}: key -> value names {sorted(said - structs_now)}, not a struct of types.h")
        sizes = {s for s in c["sizes"] if not re.search(rf"(?<!\w){re.escape(s)}(?!\w)", row["size"])}
        if sizes:
            bad.append(f"map {name}: size should name {sorted(sizes)}, the table says '{row['size']}'")
        said = (re.match(r"[a-z]*", row["pinned"].strip().lower()) or [""])[0]
        want = "yes" if c["pinned"] == {True} else "no" if c["pinned"] == {False} else "depends"
        if said != want:
            bad.append(f"map {name}: pinned should start with '{want}', the table says '{row['pinned']}'")
        if not row["written by"].strip():
            bad.append(f"map {name}: no 'written by'")
    return bad


def program_problems(c: dict[str, str], loaded: dict[str, set[int]], rows: dict[str, dict[str, str]]) -> list[str]:
    bad = [f"the loader names {n}, which bpf/bulkhead.c does not define" for n in sorted(loaded.keys() - c.keys())]
    progs = c.keys() | loaded.keys()
    bad += [f"program {n} is missing from the program table" for n in sorted(progs - rows.keys())]
    bad += [f"program {n} is in the program table but not in bpf/bulkhead.c" for n in sorted(rows.keys() - progs)]
    for name in sorted(progs & rows.keys()):
        hook = rows[name]["hook"]
        slots = loaded.get(name, set())
        said = {int(s) for s in re.findall(r"tail slot (\d+)", hook)}
        if said != slots:
            bad.append(f"program {name}: the loader puts it in tail slot(s) {sorted(slots)}, the table says {sorted(said)}")
        if c.get(name) == "__sk_buff" and not re.search(r"\bTC\b", hook):
            bad.append(f"program {name}: a TC program (struct __sk_buff), the hook should say TC")
        if c.get(name) == "xdp_md" and (not slots or name == loader.XDP_PROG) and not re.search(r"\bXDP\b", hook):
            bad.append(f"program {name}: an XDP program not only in a tail slot, the hook should say XDP")
        if not rows[name].get("what it does", "").strip():
            bad.append(f"program {name}: no 'what it does'")
    return bad


def _layout_rules() -> dict[str, set[str]]:
    spec = importlib.util.spec_from_file_location("bulkhead_test_layout", ROOT / "tests" / "unit" / "test_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ALLOWED


def room_problems(rows: dict[str, dict[str, str]], allowed: dict[str, set[str]]) -> list[str]:
    pkg = ROOT / "agent"
    rooms = {p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}
    bad = [f"room {r} is missing from the room table" for r in sorted(rooms - rows.keys())]
    bad += [f"room {r} is in the room table but agent/{r} is no room" for r in sorted(rows.keys() - rooms)]
    for room in sorted(rooms & rows.keys()):
        lives = rows[room]["what lives there"]
        mods = {p.name for p in (pkg / room).glob("*.py") if p.name != "__init__.py"}
        named = set(re.findall(r"\b\w+\.py\b", lives))
        bad += [f"room {room}: module {m} is not named in the room table" for m in sorted(mods - named)]
        bad += [f"room {room}: the room table names {m}, agent/{room} has none" for m in sorted(named - mods)]
        may = set(_ticked(rows[room]["may import"]))
        if may != set(allowed.get(room, ())):
            bad.append(f"room {room}: may import {sorted(may)} in the table, "
                       f"{sorted(allowed.get(room, ()))} in tests/unit/test_layout.py")
    return bad


def header_problems(text: str) -> list[str]:
    have = {p.name for p in (BPF / "include").glob("*.h")}
    named = {m for m in re.findall(r"^\|\s*`bpf/include/(\w+\.h)`", text, flags=re.M)}
    bad = [f"bpf/include/{h} is missing from the code layout table" for h in sorted(have - named)]
    bad += [f"the code layout table names bpf/include/{h}, which does not exist" for h in sorted(named - have)]
    return bad


def test_map_table_matches_the_c():
    bad = map_problems(c_maps(), doc_rows("map"))
    assert not bad, "docs/architecture.md map table vs bpf/:\n" + "\n".join(bad)


def test_program_table_matches_the_c_and_the_loader():
    bad = program_problems(c_programs(), loader_programs(), doc_rows("program"))
    assert not bad, "docs/architecture.md program table vs bpf/bulkhead.c and the loader:\n" + "\n".join(bad)


def test_room_table_matches_agent_and_the_import_rule():
    bad = room_problems(doc_rows("room"), _layout_rules())
    assert not bad, "docs/architecture.md room table vs agent/:\n" + "\n".join(bad)


def test_every_bpf_header_is_in_the_layout_table():
    bad = header_problems(DOC.read_text())
    assert not bad, "docs/architecture.md vs bpf/include/:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- the checks can fail


def _without_row(first_header: str, name: str) -> str:
    """architecture.md with the row naming `name` removed (whatever else that row names)."""
    text = DOC.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and f"`{name}`" in _cells(line)[0]:
            return "\n".join(lines[:i] + lines[i + 1:])
    raise AssertionError(f"no row names `{name}`")


@pytest.mark.parametrize("name", ["flow_scratch", "tails"])
def test_a_missing_map_row_fails(name):
    bad = map_problems(c_maps(), doc_rows("map", _without_row("map", name)))
    assert f"map {name} (bpf/include/maps.h) is missing from the map table" in bad


def test_slot_maps_are_expanded_from_their_macro():
    maps = c_maps()
    for n in (0, 1):
        assert {f"seg_map_{n}", f"sni_names_{n}", f"policy_{n}"} <= maps.keys()
    assert "seg_map_" not in maps and "seg_map_##n" not in maps
    assert maps["flow_events"]["types"] == {"ringbuf", "perf_event_array"}
    assert maps["ctl"]["pinned"] == {True} and maps["ev_scratch"]["pinned"] == {False}


def test_a_stale_or_wrong_map_row_fails():
    maps = c_maps()
    rows = doc_rows("map")
    rows["gone_map"] = dict(rows["ctl"])
    rows["frags"] = dict(rows["frags"], type="`hash`", pinned="no")
    rows["ctl"] = dict(rows["ctl"], **{"key -> value": "0 -> `bh_gone`"})
    rows["stats"] = dict(rows["stats"], size="`BH_REASON_MAX_OLD`")
    bad = map_problems(maps, rows)
    assert "map ctl: key -> value should name ['bh_ctl'] (the C declares it so)" in bad
    assert "map ctl: key -> value names ['bh_gone'], not a struct of types.h" in bad
    assert any(b.startswith("map stats: size should name ['BH_REASON_MAX']") for b in bad)
    assert "map gone_map is in the map table but declared nowhere in bpf/" in bad
    assert "map frags: type ['hash'] in the table, ['lru_hash'] in the C" in bad
    assert "map frags: pinned should start with 'yes', the table says 'no'" in bad


def test_a_missing_or_misplaced_program_row_fails():
    rows = doc_rows("program", _without_row("program", loader.TC_PROG))
    bad = program_problems(c_programs(), loader_programs(), rows)
    assert f"program {loader.TC_PROG} is missing from the program table" in bad
    rows = doc_rows("program")
    rows[loader.REJECT_PROG] = dict(rows[loader.REJECT_PROG], hook="tail slot 7")
    bad = program_problems(c_programs(), loader_programs(), rows)
    assert any(b.startswith(f"program {loader.REJECT_PROG}: the loader puts it in tail slot(s)") for b in bad)


def test_a_missing_room_or_module_fails():
    rows = doc_rows("room")
    allowed = _layout_rules()
    del rows["l7"]
    rows["core"] = dict(rows["core"], **{"what lives there": "nothing", "may import": "`l7`"})
    bad = room_problems(rows, allowed)
    assert "room l7 is missing from the room table" in bad
    assert "room core: module wire.py is not named in the room table" in bad
    assert any(b.startswith("room core: may import ['l7']") for b in bad)


def test_a_missing_header_fails():
    text = "\n".join(line for line in DOC.read_text().splitlines() if not line.startswith("| `bpf/include/maps.h`"))
    assert "bpf/include/maps.h is missing from the code layout table" in header_problems(text)


# ---------------------------------------------------------------------------- links between the docs


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def link_problems(paths: list[Path], base: Path | None = None) -> list[str]:
    """Relative links that leave the repository, name no file, or name no heading of it.

    Links resolve from each file's folder, or from `base` (a file written elsewhere, as if in it).
    """
    bad = []
    for path in paths:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        if "../shared" in text:
            bad.append(f"{where}: refers to ../shared, which is not part of the repository")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = ((base or path.parent) / file).resolve() if file else path
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{where}: link {target}: no such file in the repository")
                continue
            if anchor and dest.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", dest.read_text(),
                                                                               flags=re.S), flags=re.M)}
                if anchor not in heads:
                    bad.append(f"{where}: link {target}: {dest.relative_to(ROOT)} has no heading #{anchor}")
    return bad


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_doc_links_stay_in_the_repository_and_resolve():
    bad = link_problems(DOCS)
    assert not bad, "\n".join(bad)


def test_a_broken_link_fails(tmp_path):
    fake = tmp_path / "page.md"
    fake.write_text("[a](../shared/ARCHITECTURE.md) [b](architecture.md#no-such-part) [c](architecture.md#maps)\n")
    bad = link_problems([fake], base=ROOT / "docs")
    assert len(bad) == 3, bad
    assert "refers to ../shared" in bad[0] and "no such file" in bad[1] and "has no heading #no-such-part" in bad[2]
