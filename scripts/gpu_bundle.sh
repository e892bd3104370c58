#!/usr/bin/env bash
# Build .gpu_bundle/: what the lent GPU machine lacks to run `dynamo-ext serve` (etcd, nats-server, Dynamo's
# frontend, our workers), repacked small enough to travel with the tree in one remote call (64 MiB in all).
#
#   bash scripts/gpu_bundle.sh                 # cp312 build for the GPU machine -> .gpu_bundle/
#   bash scripts/gpu_bundle.sh --python 3.11   # the SAME bundle for this machine's Python -> .gpu_bundle-py311/
#   (then on the GPU machine, from the repository root, with `.gpu_bundle` named in `carry`:
#    bash scripts/gpu_run.sh -- python3 -m dynamo_ext.cli serve graphs/disagg.py -f configs/disagg.yaml --once "...")
#
# Archives (tar + xz with the x86 BCJ filter, preset 9e), each unpacked by scripts/gpu_run.sh:
#   dynamo-runtime.tar.xz -> site  ai-dynamo-runtime (the `dynamo` package; cp310-abi3, so the same for every
#                                  Python), dynamo/_core.abi3.so stripped (226 -> 174 MB), licence/SBOM files dropped
#   nixl.tar.xz           -> site  nixl (meta package, without nixl_ep) + nixl-cu13 for this Python, trimmed to the
#                                  UCX and POSIX plugins: no nixl_ep_cu13, no GDS/GPUNETIO/LIBFABRIC/OBJ/AZURE/GUSLI/
#                                  INFINIA plugins, no telemetry/trace exporters, no InfiniBand/EFA UCX modules, no
#                                  UCX perftest, no headers/example programs; every bundled shared library that no
#                                  kept ELF file needs (NEEDED closure) is dropped (AWS, Azure, ibverbs, mlx5, ...)
#   python.tar.xz         -> site  ai-dynamo (without its vllm/sglang/trtllm/tokenspeed backends and tests dirs),
#                                  pydantic + pydantic-core, annotated-types, typing-inspection, typing_extensions,
#                                  msgspec, nats-py, etcd3aio
#   servers.tar.xz        -> bin   etcd and nats-server from the Debian packages etcd-server / nats-server
# plus manifest.txt (versions, wheel tags, sizes, sha256; see "Manifest" below).
# Sizes (cp312, 2026-12-04): dynamo-runtime 35.6 MiB, nixl 7.0, python 2.6, servers 7.1 = 52.2 MiB
# (54,708,797 bytes); with the tree (~2.8 MiB) a call carries ~55 MiB of its 64. The 3.11 bundle: 52.2 MiB too.
#
# Versions: exactly those installed in .venv (`pip freeze`; requirements/constraints.txt when .venv is absent).
# Compiled wheels are fetched with `pip download --only-binary=:all: --python-version X.Y --implementation cp
# --abi cpXY --platform manylinux_2_28_x86_64 (and older manylinux tags) --no-deps`, and every wheel's tags are
# checked (cpXY-cpXY or cp3N-abi3 with N <= Y, manylinux x86_64, glibc <= 2.28; pure wheels py3-none-any).
#
# Idempotent: wheels and .deb files are cached in .gpu_bundle-cache/ (ignored, never carried); every archive is
# cached there under a key made of its inputs' sha256 and the text of the function that builds it, so a re-run
# that changes nothing only re-checks and re-writes the manifest. The output folder holds only the archives and
# the manifest, so carrying it costs exactly the printed total.
#
# Manifest (manifest.txt, one record per line, fields separated by single spaces, '#' starts a comment):
#   format 1
#   python X.Y                     the Python the compiled modules are built for
#   platform manylinux_2_28_x86_64
#   wheel NAME VERSION FILE SHA256 TAG-TRIPLE
#   deb PACKAGE VERSION FILE SHA256
#   binary NAME VERSION SHA256     (the file as carried: bin/NAME)
#   archive FILE DEST BYTES SHA256 (DEST: site | bin; gpu_run.sh checks BYTES and SHA256 before unpacking)
#   total BYTES
#
# Measured here (2 CPU cores): first build ~4 min (xz of the runtime ~2 min), re-run ~3 s (all cached).
# Sizes and the local proof: see README.md, "Running on the lent GPU machine".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYVER=3.12
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=${2:?--python needs X.Y}; shift 2 ;;
    --python=*) PYVER=${1#*=}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "gpu_bundle.sh: --python wants X.Y, got $PYVER" >&2; exit 2; }
PYTAG=cp${PYVER/./}
if [ -z "$OUT" ]; then
  if [ "$PYVER" = 3.12 ]; then OUT=.gpu_bundle; else OUT=.gpu_bundle-py${PYVER/./}; fi
fi
CACHE=${DX_BUNDLE_CACHE:-.gpu_bundle-cache}
WHEELS=$CACHE/wheels
DEBS=$CACHE/debs
ARCH=$CACHE/archives
STAGE=$CACHE/stage-$PYTAG
PLATFORM=manylinux_2_28_x86_64
XZ_OPTS=(--x86 --lzma2=preset=9e -T1)
XZ_BIG_OPTS=(--x86 --lzma2=preset=9e,dict=192MiB -T1)   # the runtime tar is ~180 MB
mkdir -p "$WHEELS" "$DEBS" "$ARCH" "$OUT"
log() { echo "[gpu_bundle] $*" >&2; }
die() { echo "[gpu_bundle] ERROR: $*" >&2; exit 1; }
for tool in readelf strip xz tar sha256sum unzip; do command -v $tool >/dev/null || die "needs \`$tool\`"; done
HOSTPY=$(command -v python3) || die "needs python3"
if [ -x .venv/bin/python ]; then PIP=(.venv/bin/python -m pip); else PIP=("$HOSTPY" -m pip); fi

# -- versions: exactly what .venv has ----------------------------------------------------------------------------
if [ -x .venv/bin/python ]; then FREEZE=$(.venv/bin/python -m pip freeze 2>/dev/null); SRC=".venv (pip freeze)"
else FREEZE=$(cat requirements/constraints.txt); SRC=requirements/constraints.txt; fi
version_of() {  # normalised name -> version
  local want; want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  echo "$FREEZE" | awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/,"-",n); if (n==w) {print $2; exit}}'
}
COMPILED=(ai-dynamo-runtime nixl-cu13 msgspec pydantic-core)
PURE=(ai-dynamo nixl pydantic annotated-types typing-inspection typing-extensions nats-py etcd3aio)
declare -A VER
for p in "${COMPILED[@]}" "${PURE[@]}"; do
  v=$(version_of "$p"); [ -n "$v" ] || die "$p is not in $SRC"
  VER[$p]=$v
done
log "python $PYVER ($PYTAG), versions from $SRC, output $OUT/"

# -- wheels: cached, tags checked ----------------------------------------------------------------------------------
pick_wheel() {  # NAME VERSION KIND(compiled|pure) -> path of a cached wheel whose tags fit, or nothing
  "$HOSTPY" - "$WHEELS" "$1" "$2" "$3" "$PYVER" <<'PY'
import os, re, sys
wheels, name, ver, kind, pyver = sys.argv[1:]
major, minor = map(int, pyver.split("."))
norm = re.sub(r"[-_.]+", "_", name).lower()
def fits(fn):
    parts = fn[:-4].split("-")
    if len(parts) not in (5, 6) or parts[0].lower() != norm or parts[1] != ver:
        return False
    py, abi, plat = (set(parts[-3].split(".")), set(parts[-2].split(".")), set(parts[-1].split(".")))
    if kind == "pure":
        return abi == {"none"} and plat == {"any"} and bool(py & {"py3", f"py{major}{minor}"})
    ok_abi = (f"cp{major}{minor}" in abi and f"cp{major}{minor}" in py) or (
        "abi3" in abi and any(re.fullmatch(rf"cp{major}(\d+)", t) and int(t[3:]) <= minor for t in py))
    def glibc_ok(p):
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
        if m:
            return (int(m.group(1)), int(m.group(2))) <= (2, 28)
        return p in ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
    return ok_abi and any(glibc_ok(p) for p in plat)
for fn in sorted(os.listdir(wheels)):
    if fn.endswith(".whl") and fits(fn):
        print(os.path.join(wheels, fn)); break
PY
}
declare -A WHL
for p in "${COMPILED[@]}" "${PURE[@]}"; do
  kind=pure; [[ " ${COMPILED[*]} " == *" $p "* ]] && kind=compiled
  w=$(pick_wheel "$p" "${VER[$p]}" $kind)
  if [ -z "$w" ]; then
    log "downloading $p==${VER[$p]} ($kind, $PYTAG)"
    "${PIP[@]}" download -q --only-binary=:all: --no-deps -d "$WHEELS" --python-version "$PYVER" \
      --implementation cp --abi "$PYTAG" --platform "$PLATFORM" --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 "$p==${VER[$p]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    w=$(pick_wheel "$p" "${VER[$p]}" $kind)
    [ -n "$w" ] || die "no $kind wheel for $p==${VER[$p]} with tags for Python $PYVER / $PLATFORM in $WHEELS"
  fi
  WHL[$p]=$w
done

# -- Debian packages for the servers -------------------------------------------------------------------------------
deb_for() {  # PACKAGE -> cached .deb (downloaded when absent)
  local d; d=$(ls "$DEBS"/"$1"_*_amd64.deb 2>/dev/null | tail -1 || true)
  if [ -z "$d" ]; then
    log "apt-get download $1"
    (cd "$DEBS" && apt-get download "$1" >/dev/null 2>&1) || true
    d=$(ls "$DEBS"/"$1"_*_amd64.deb 2>/dev/null | tail -1 || true)
  fi
  echo "$d"
}
ETCD_DEB=$(deb_for etcd-server)
NATS_DEB=$(deb_for nats-server)
[ -n "$ETCD_DEB" ] && [ -n "$NATS_DEB" ] || die "could not get the Debian packages etcd-server and nats-server (apt-get download)"

# -- archives ------------------------------------------------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
unpack_wheel() { mkdir -p "$2" && unzip -q -o "$1" -d "$2"; }

build_runtime() {  # DIR
  unpack_wheel "${WHL[ai-dynamo-runtime]}" "$1"
  rm -rf "$1"/ai_dynamo_runtime-*.dist-info/sboms "$1"/ai_dynamo_runtime-*.dist-info/licenses/THIRD-PARTY-*
  chmod u+w "$1/dynamo/_core.abi3.so"
  strip --strip-unneeded "$1/dynamo/_core.abi3.so"
}

build_nixl() {  # DIR
  unpack_wheel "${WHL[nixl]}" "$1"
  unpack_wheel "${WHL[nixl-cu13]}" "$1"
  local d=$1
  rm -rf "$d"/nixl_ep "$d"/nixl_ep_cu13 "$d"/nixl_cu13-*.data "$d"/nixl_cu13.scripts
  local plugdir
  for plugdir in "$d/.nixl_cu13.mesonpy.libs/plugins" "$d/nixl_cu13.libs/nixl"; do
    find "$plugdir" -maxdepth 1 -name '*.so' ! -name libplugin_UCX.so ! -name libplugin_POSIX.so -delete
  done
  find "$d/nixl_cu13.libs/ucx" -maxdepth 1 \( -name 'libuct_ib*' -o -name 'libucx_perftest*' \) -delete
  # keep only the shared libraries that a kept ELF file needs (transitively); UCX modules and plugins are
  # dlopen'ed, so they are roots
  "$HOSTPY" - "$d" <<'PY'
import os, subprocess, sys
d = sys.argv[1]
libdirs = [os.path.join(d, ".nixl_cu13.mesonpy.libs"), os.path.join(d, "nixl_cu13.libs")]
def is_elf(p):
    with open(p, "rb") as f:
        return f.read(4) == b"\x7fELF"
by_name, roots = {}, []
for libdir in libdirs:
    for fn in os.listdir(libdir):
        p = os.path.join(libdir, fn)
        if os.path.isfile(p) and is_elf(p):
            by_name[fn] = p
for sub in ("nixl_cu13", ".nixl_cu13.mesonpy.libs/plugins", "nixl_cu13.libs/nixl", "nixl_cu13.libs/ucx"):
    for fn in os.listdir(os.path.join(d, sub)):
        p = os.path.join(d, sub, fn)
        if os.path.isfile(p) and is_elf(p):
            roots.append(p)
            by_name.setdefault(fn, p)
def needed(p):
    out = subprocess.run(["readelf", "-d", p], check=True, capture_output=True, text=True).stdout
    return [l.split("[", 1)[1].rstrip("]") for l in out.splitlines() if "(NEEDED)" in l]
keep, todo = set(), list(roots)
while todo:
    p = todo.pop()
    if p in keep:
        continue
    keep.add(p)
    todo += [by_name[n] for n in needed(p) if n in by_name]
dropped = 0
for libdir in libdirs:
    for fn in sorted(os.listdir(libdir)):
        p = os.path.join(libdir, fn)
        if os.path.isfile(p) and is_elf(p) and p not in keep:
            dropped += os.path.getsize(p); os.remove(p)
print(f"[gpu_bundle] nixl: kept {len(keep)} ELF files, dropped {dropped / 1e6:.1f} MB of unneeded libraries",
      file=sys.stderr)
PY
}

build_python() {  # DIR
  local p
  for p in ai-dynamo pydantic pydantic-core annotated-types typing-inspection typing-extensions msgspec \
           nats-py etcd3aio; do
    unpack_wheel "${WHL[$p]}" "$1"
  done
  rm -rf "$1"/dynamo/vllm "$1"/dynamo/sglang "$1"/dynamo/trtllm "$1"/dynamo/tokenspeed
  find "$1/dynamo" -depth -type d -name tests -exec rm -rf {} +
}

build_servers() {  # DIR
  local x; x=$(mktemp -d)
  dpkg-deb -x "$ETCD_DEB" "$x/etcd"; dpkg-deb -x "$NATS_DEB" "$x/nats"
  mkdir -p "$1"
  install -m 0755 "$x/etcd/usr/bin/etcd" "$1/etcd"
  install -m 0755 "$(find "$x/nats" -type f -name nats-server | head -1)" "$1/nats-server"
  strip "$1/etcd" "$1/nats-server" 2>/dev/null || true   # the Debian binaries are already stripped
  rm -rf "$x"
}

make_archive() {  # NAME BUILD-FUNCTION BIG(0|1) INPUT-FILES...
  local name=$1 fn=$2 big=$3; shift 3
  local key f
  key=$( { declare -f "$fn"; echo "${XZ_OPTS[*]} ${XZ_BIG_OPTS[*]}"; for f in "$@"; do sha "$f"; done; } | sha256sum | cut -c1-16)
  local cached=$ARCH/${name%.tar.xz}-$key.tar.xz
  if [ ! -s "$cached" ]; then
    log "building $name (tar + xz -9e; the runtime takes ~2 min)"
    local dir=$STAGE/${name%.tar.xz}
    rm -rf "$dir"; mkdir -p "$dir"
    "$fn" "$dir"
    find "$dir" -name __pycache__ -type d -prune -exec rm -rf {} +
    local opts=("${XZ_OPTS[@]}"); [ "$big" = 1 ] && opts=("${XZ_BIG_OPTS[@]}")
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir" -cf - . \
      | xz "${opts[@]}" > "$cached.tmp"
    mv "$cached.tmp" "$cached"
    rm -rf "$dir"
  else
    log "$name: cached ($cached)"
  fi
  cp -f "$cached" "$OUT/$name"
}

make_archive dynamo-runtime.tar.xz build_runtime 1 "${WHL[ai-dynamo-runtime]}"
make_archive nixl.tar.xz build_nixl 0 "${WHL[nixl]}" "${WHL[nixl-cu13]}"
make_archive python.tar.xz build_python 0 "${WHL[ai-dynamo]}" "${WHL[pydantic]}" "${WHL[pydantic-core]}" \
  "${WHL[annotated-types]}" "${WHL[typing-inspection]}" "${WHL[typing-extensions]}" "${WHL[msgspec]}" \
  "${WHL[nats-py]}" "${WHL[etcd3aio]}"
make_archive servers.tar.xz build_servers 0 "$ETCD_DEB" "$NATS_DEB"
ARCHIVES=(dynamo-runtime.tar.xz nixl.tar.xz python.tar.xz servers.tar.xz)
# anything else in the output folder would be carried too: remove it
for f in "$OUT"/* "$OUT"/.[!.]*; do
  [ -e "$f" ] || continue
  b=$(basename "$f")
  [[ " ${ARCHIVES[*]} manifest.txt " == *" $b "* ]] || { log "removing stray $f"; rm -rf "$f"; }
done

# -- manifest ------------------------------------------------------------------------------------------------------
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar -xJf "$OUT/servers.tar.xz" -C "$tmp"
ETCD_VER=$(dpkg-deb -f "$ETCD_DEB" Version); NATS_VER=$(dpkg-deb -f "$NATS_DEB" Version)
total=0
{
  echo "# dynamo_ext GPU bundle, written by scripts/gpu_bundle.sh; unpacked by scripts/gpu_run.sh"
  echo "format 1"
  echo "python $PYVER"
  echo "platform $PLATFORM"
  for p in "${COMPILED[@]}" "${PURE[@]}"; do
    w=${WHL[$p]}; b=$(basename "$w"); t=${b%.whl}
    echo "wheel $p ${VER[$p]} $b $(sha "$w") $(echo "$t" | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')"
  done
  echo "deb etcd-server $ETCD_VER $(basename "$ETCD_DEB") $(sha "$ETCD_DEB")"
  echo "deb nats-server $NATS_VER $(basename "$NATS_DEB") $(sha "$NATS_DEB")"
  echo "binary etcd $ETCD_VER $(sha "$tmp/etcd")"
  echo "binary nats-server $NATS_VER $(sha "$tmp/nats-server")"
  for a in "${ARCHIVES[@]}"; do
    dest=site; [ "$a" = servers.tar.xz ] && dest=bin
    n=$(stat -c %s "$OUT/$a"); total=$((total + n))
    echo "archive $a $dest $n $(sha "$OUT/$a")"
  done
  echo "total $total"
} > "$OUT/manifest.txt.tmp"
mv "$OUT/manifest.txt.tmp" "$OUT/manifest.txt"

for a in "${ARCHIVES[@]}"; do
  printf '[gpu_bundle] %-24s %6.1f MiB\n' "$a" "$(mib "$(stat -c %s "$OUT/$a")")" >&2
done
all=$(du -cb "$OUT"/* | tail -1 | cut -f1)
printf '[gpu_bundle] total %s: %.1f MiB (%d bytes); carry it: the tree + this must stay under 64 MiB\n' \
  "$OUT" "$(mib "$all")" "$all" >&2
if tree=$(git ls-files -z -co --exclude-standard 2>/dev/null | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'); then
  printf '[gpu_bundle] a remote call would carry the tree (tracked + untracked, not ignored: %.1f MiB) + %s = %.1f MiB of 64\n' \
    "$(mib "$tree")" "$OUT" "$(mib $((tree + all)))" >&2
fi
if [ "$all" -gt $((58 * 1048576)) ]; then die "the bundle is over 58 MiB"; fi
