"""Write the man pages (docs/man/) and the shell completion (docs/completion/)
from the sources they document:

- smtpgate(8), smtpgate-send(1) and smtpgate-sendmail(8) from the argparse
  parsers of --help, with argparse-manpage;
- smtpgate.toml(5) from docs/configuration.md (a small Markdown-to-roff
  conversion of ours: no maintained tool reads that page's tables);
- bash and zsh completion of `smtpgate` from the parser, with shtab.

    python docs/man/generate.py            # rewrite the files
    python docs/man/generate.py --check    # exit 1 if any is out of date

Both tools are the `dev` extra (pyproject.toml); tests/test_cli.py
runs --check, so a change of a flag or a key without a rerun fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
MAN = DOCS / "man"
COMPLETION = DOCS / "completion"
# The pages' date: fixed, so that a rerun on another day changes nothing.
# Set it to the release's date when the version changes.
RELEASE_EPOCH = "1796515200"  # 2026-12-06
URL = "https://github.com/smtpgate/smtpgate"

# (file, module, function, section, prog, one-line description)
PARSER_PAGES = [
    ("smtpgate.8", "smtpgate.tools.cli", "build_parser", 8, "smtpgate",
     "mail relay daemon: hand a message over in one line, it is stored durably and relayed over SMTP"),
    ("smtpgate-send.1", "smtpgate.tools.cli", "send_parser", 1, "smtpgate-send",
     "hand one message to the smtpgate daemon"),
    ("smtpgate-sendmail.8", "smtpgate.tools.sendmail", "help_parser", 8, "smtpgate-sendmail",
     "sendmail-compatible command in front of the smtpgate daemon"),
]


def _version() -> str:
    from smtpgate import __version__

    return __version__


def parser_page(module: str, function: str, section: int, prog: str, description: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".include", encoding="utf-8") as include:
        include.write(exit_status(module, function) if prog == "smtpgate" else "")
        include.flush()
        done = subprocess.run(
            [sys.executable, "-c", "from argparse_manpage.cli import main; main()", "--module", module,
             "--function", function, "--manual-section", str(section), "--manual-title", "smtpgate manual",
             "--project-name", "smtpgate", "--version", _version(), "--prog", prog,
             "--description", description, "--url", URL, "--include", include.name],
            capture_output=True, text=True, check=True, env=dict(os.environ, SOURCE_DATE_EPOCH=RELEASE_EPOCH))
    return done.stdout


def exit_status(module: str, function: str) -> str:
    """smtpgate(8)'s EXIT STATUS: each command's exit-code table, from the
    epilog of its --help (argparse-manpage shows subcommands' options, not
    their epilogs)."""
    import importlib

    from smtpgate.tools.sendmail import help_parser

    parser = getattr(importlib.import_module(module), function)()
    commands = next(a for a in parser._actions if a.choices and hasattr(a, "_name_parser_map")).choices
    out = ["[EXIT STATUS]", "Each command exits with the codes of sysexits.h (docs/exit-codes.md):"]
    for name, command in commands.items():
        text = (help_parser() if name == "sendmail" else command).epilog or ""
        rows = re.findall(r"^  (\d+) +(.*(?:\n {6}.*)*)", text, re.M)
        if rows:
            out.append(f".SS {name}")
            out += [f".TP\n.B {code}\n" + _line(_roff_text(" ".join(row.split())).replace("-", "\\-"))
                    for code, row in rows]
    return "\n".join(out) + "\n"


def _roff_text(text: str) -> str:
    """Inline Markdown to roff: `code` bold, links as their text, escapes."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", text)
    return text


def _line(text: str) -> str:
    # A line starting with . or ' would be a roff request.
    return "\\&" + text if text[:1] in (".", "'") else text


def config_page() -> str:
    """smtpgate.toml(5) from docs/configuration.md: headings become sections,
    each table row a tagged paragraph (the key, then its type, default and
    meaning), code blocks stay as they are."""
    source = (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines()
    out = [f'.TH SMTPGATE.TOML 5 2026\\-12\\-06 "smtpgate {_version()}" "smtpgate manual"',
           ".SH NAME", "smtpgate.toml \\- the configuration file of smtpgate(8)",
           ".SH SYNOPSIS", "/etc/smtpgate/smtpgate.toml", ".SH DESCRIPTION"]
    header: list[str] = []
    in_code = False
    for raw in source[1:]:  # the page's own title is NAME
        if raw.startswith("```"):
            in_code = not in_code
            out.append(".PP\n.nf\n.RS 4" if in_code else ".RE\n.fi")
            continue
        if in_code:
            out.append(_line(raw.replace("\\", "\\e")))
            continue
        if raw.startswith("#"):
            level, title = len(raw) - len(raw.lstrip("#")), raw.lstrip("#").strip()
            out.append((".SH " if level <= 2 else ".SS ") + _roff_text(title).upper() * (level <= 2)
                       + _roff_text(title) * (level > 2))
            continue
        if raw.startswith("|"):
            cells = [c.strip() for c in raw.strip().strip("|").split("|")]
            if set("".join(cells)) <= {"-", " "}:
                continue
            if not header:
                header = cells
                continue
            out.append(".TP\n" + _line(_roff_text(cells[0])))
            details = [f"{name}: {_roff_text(cell)}" for name, cell in zip(header[1:-1], cells[1:-1], strict=True)]
            out.append(_line(("; ".join(details) + ". " if details else "") + _roff_text(cells[-1])))
            continue
        header = []
        if not raw.strip():
            out.append(".PP")
        elif raw.startswith("- "):
            out.append(".IP \\(bu 2\n" + _line(_roff_text(raw[2:])))
        else:
            out.append(_line(_roff_text(raw.strip())))
    out += [".SH SEE ALSO", "smtpgate(8), smtpgate\\-send(1), smtpgate\\-sendmail(8)", ""]
    return re.sub(r"(\.PP\n)+", ".PP\n", "\n".join(out))


def completion(shell: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shtab", "--shell", shell, "--error-unimportable",
                           "smtpgate.tools.cli.build_parser"], capture_output=True, text=True, check=True)
    return done.stdout


def generated() -> dict[Path, str]:
    files = {MAN / name: parser_page(*rest) for name, *rest in PARSER_PAGES}
    files[MAN / "smtpgate.toml.5"] = config_page()
    files[COMPLETION / "smtpgate.bash"] = completion("bash")
    files[COMPLETION / "_smtpgate"] = completion("zsh")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date; write nothing")
    check = parser.parse_args().check
    stale = []
    for path, text in generated().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'out of date' if check else 'wrote'}: {path.relative_to(DOCS.parent)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
