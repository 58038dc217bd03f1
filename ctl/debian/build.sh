#!/usr/bin/env bash
# Builds the Debian package: target/debian/portwatch_VERSION-1_amd64.deb (its path is the last
# line printed). The release binary first, then what is made from it and from examples/ into
# target/release/package/ (never committed: the man page and completions come from the command
# line's definitions, the units from examples/ with the package's paths), then `cargo deb`, which
# reads ctl/Cargo.toml's [package.metadata.deb]. docs/install.md says what the package holds.
#
#     ctl/debian/build.sh          (as root it runs .ci/bootstrap first, which installs cargo-deb)
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ $(id -u) -ne 0 ]] || .ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
# The generated files are found under the workspace's own target/ (ctl/Cargo.toml names them there).
unset CARGO_TARGET_DIR

cargo build --release --locked -p portwatch
bin=target/release/portwatch
out=target/release/package
rm -rf "$out"
mkdir -p "$out/units"

"$bin" man | gzip -9n >"$out/portwatch.8.gz"
for shell in bash zsh fish; do
  "$bin" completions "$shell" >"$out/portwatch.$shell"
done

# examples/ is written for a binary installed by hand (/usr/local/sbin, /usr/local/share/doc); the
# package's files are under /usr. The lines that say how to install a unit by hand are dropped
# (with the empty comment line above them).
for unit in examples/*.service examples/*.timer; do
  sed 's|/usr/local/|/usr/|g' "$unit" | awk '
    /^#   (install|systemctl) / { held = ""; next }
    { if (held != "") print held; held = "" }
    /^#$/ { held = $0; next }
    { print }
    END { if (held != "") print held }' >"$out/units/$(basename "$unit")"
done
if grep -rl /usr/local "$out/units"; then
  echo "build.sh: a unit above still names /usr/local" >&2
  exit 1
fi

read -r version license < <(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
p = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "portwatch")
print(p["version"], p["license"])')

# The changelog's newest entry is this version (cargo-deb adds the revision, -1).
newest=$(sed -n '1s/^portwatch (\([^)]*\)).*/\1/p' ctl/debian/changelog)
if [[ $newest != "$version-1" ]]; then
  echo "build.sh: ctl/debian/changelog's newest entry is $newest, the package is $version-1: add an entry" >&2
  exit 1
fi

# /usr/share/doc/portwatch/copyright (DEP-5) says the workspace's license, with each license's text.
{
  printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: portwatch\n\n'
  printf 'Files: *\nCopyright: 2026 portwatch developers\nLicense: %s\n' "${license// OR / or }"
  for id in ${license// OR / }; do
    printf '\nLicense: %s\n' "$id"
    case $id in
      Apache-2.0) echo " On Debian systems, the full text of the Apache License, Version 2.0 is in"
        echo " /usr/share/common-licenses/Apache-2.0." ;;
      MIT) sed 's/^/ /; s/^ $/ ./' <<'TEXT'
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
TEXT
        ;;
      *) echo "build.sh: no license text for $id (the workspace's license): add it here" >&2
        exit 1 ;;
    esac
  done
} >"$out/copyright"

cargo deb -p portwatch --no-build --locked
