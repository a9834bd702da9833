"""shim/footprint.py: OpenSSL stays out of the serving process, and what
stood in for it still works when something does use it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_the_serving_modules_load_no_openssl() -> None:
    out = _run("""
        import sys
        import shim.cli, shim.server, shim.proxy, shim.page
        print(sorted(m for m in ("_ssl", "_hashlib") if sys.modules.get(m) is not None))
    """)
    assert out == "[]"


def test_ssl_is_the_real_module_at_its_first_use() -> None:
    out = _run("""
        import shim, ssl, sys
        deferred = type(ssl).__name__
        context = ssl.create_default_context()
        from ssl import SSLContext
        print(deferred, type(context) is SSLContext, sys.modules["ssl"].SSLContext is SSLContext,
              ssl.PROTOCOL_TLS_CLIENT == sys.modules["ssl"].PROTOCOL_TLS_CLIENT)
    """)
    assert out == "_DeferredModule True True True"


def test_hashes_and_digest_compare_without_openssl() -> None:
    out = _run("""
        import shim, hashlib, hmac, secrets
        print(hashlib.sha256(b"abc").hexdigest()[:16], hmac.compare_digest(b"k", b"k"),
              secrets.compare_digest("a", "b"), len(secrets.token_hex(8)))
    """)
    assert out == "ba7816bf8f01cfea True False 16"


def test_an_ssl_imported_before_stays() -> None:
    out = _run("""
        import ssl, _hashlib
        import shim, sys
        print(type(sys.modules["ssl"]).__name__, sys.modules["_hashlib"] is _hashlib)
    """)
    assert out == "module True"


def test_serving_loads_no_zip_reader_and_no_idna_codec() -> None:
    """The page's files come from the package's folder (importlib.resources'
    readers import zipfile), and the listener's address is looked up as
    bytes (text would import the "idna" codec and stringprep's tables)."""
    out = _run("""
        import sys, trio
        import shim.cli, shim.server, shim.proxy
        from shim import listen, page
        files = page.load_files()
        async def main():
            for host in ("127.0.0.1", "localhost"):
                for listener in await listen.listeners(host, 0):
                    await listener.aclose()
        trio.run(main)
        print(sorted(m for m in ("zipfile", "importlib.resources.readers", "encodings.idna", "stringprep")
                     if m in sys.modules), all(f.body for f in files.values()))
    """)
    assert out == "[] True"


def test_serve_lets_the_command_line_parser_go(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engines.main]\ncommand = ["vllm", "serve", "m"]\n')
    out = _run(f"""
        import sys, trio
        from shim import cli
        trio.run = lambda fn, cfg: print("argparse" in sys.modules, "gettext" in sys.modules, fn.__name__)
        cli.main(["--config", {str(cfg)!r}, "serve"])
    """)
    assert out == "False False serve"


def test_a_forgotten_module_is_collected_and_comes_back_when_imported() -> None:
    out = _run("""
        import sys, weakref
        import argparse
        from shim import footprint
        ref = weakref.ref(argparse)
        del argparse
        footprint.forget("argparse")
        gone = ref() is None and "argparse" not in sys.modules
        import argparse
        print(gone, argparse.ArgumentParser(prog="x").parse_args([]) is not None)
    """)
    assert out == "True True"
