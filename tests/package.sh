#!/usr/bin/env bash
# The Debian package as an operator meets it (docs/install.md): ctl/debian/build.sh builds it,
# lintian checks it (an error fails), then dpkg installs it into a throwaway Debian 12 root
# (debootstrap --variant=minbase, made once and kept in /var/cache/portwatch-ci), where every
# file is checked with its mode, the units are verified by that root's systemd-analyze against
# the installed binary, the man page renders with `man`, the bash completion loads, and the
# installed binary runs `--version`, `check` and `apply` of the shipped configuration (which
# attaches nothing; /sys/fs/bpf is bound in, the pin path is the test's own). Installing the same
# package again (an upgrade's scripts) must leave that state and the edited file; `dpkg -r` must
# drain what is loaded into the log, and after `dpkg -P` nothing but that log may be left. One closing
# line; exit code 1 if any check failed. Runs on the host as root (.ci/run).
#
#     tests/package.sh             the test
#     tests/package.sh build       only the package (ctl/debian/build.sh): its path is the last line
#
# Outside CI, a root that cannot be made (no network) is a SKIPPED line; under CI=true a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == build ]]; then
  exec ctl/debian/build.sh
fi
.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
started=$SECONDS
out=$PWD/target/package
mkdir -p "$out"
say() { printf 'package: %s\n' "$*" >&2; }
passed=0
failed=0
ok() { passed=$((passed + 1)); }
fail() {
  failed=$((failed + 1))
  say "FAILED: $*"
}
finish() {
  say "$((SECONDS - started)) s"
  echo "package: $passed passed, $failed failed"
  exit $((failed > 0 ? 1 : 0))
}

say "building the package (ctl/debian/build.sh)"
if ! deb=$(ctl/debian/build.sh 2>"$out/build.log" | tail -n 1) || [[ ! -f $deb ]]; then
  cat "$out/build.log" >&2
  fail "ctl/debian/build.sh: ${deb:-}"
  finish
fi
ok
version=$(dpkg-deb -f "$deb" Version)

# lintian: an error fails; what remains overridden is ctl/debian/lintian-overrides, with reasons.
if lintian --fail-on error --info "$deb" >"$out/lintian.log" 2>&1; then
  ok
else
  fail "lintian:"
  grep -E '^E:' "$out/lintian.log" >&2 || cat "$out/lintian.log" >&2
fi
grep -E '^[EW]:' "$out/lintian.log" >&2 || true

# The root: Debian 12's minbase, plus man-db (the page as `man` finds it), systemd (its
# systemd-analyze checks the installed units against the installed binary) and netbase (the
# package's one dependency beyond libc). Remade when this list changes. Kept outside the
# repository, as .ci/bootstrap keeps kubernetes-validate, so that a fresh clone (CI) reuses it.
include=man-db,systemd,netbase
base=/var/cache/portwatch-ci/bookworm-minbase
if [[ $(cat "$base/.made" 2>/dev/null) != "$include" ]]; then
  say "making a Debian 12 root with debootstrap (about 2 minutes; cached in $base)"
  rm -rf --one-file-system "$base" "$base.new"
  mkdir -p "$(dirname "$base")"
  if debootstrap --variant=minbase --include="$include" bookworm "$base.new" http://deb.debian.org/debian \
    >"$out/debootstrap.log" 2>&1; then
    mv "$base.new" "$base"
    echo "$include" >"$base/.made"
  else
    tail -n 5 "$out/debootstrap.log" >&2
    rm -rf --one-file-system "$base.new"
    if [[ ${CI:-} == true ]]; then
      fail "debootstrap could not make the root ($out/debootstrap.log)"
    else
      echo "SKIPPED package: debootstrap could not make the root (no network?): the install checks did not run"
    fi
    finish
  fi
fi

work=$(mktemp -d /tmp/portwatch-package.XXXXXX)
root=$work/root
pin=/sys/fs/bpf/portwatch-package-$$
cleanup() {
  # What a failed check may have left loaded, with the binary the test built.
  [[ ! -d $pin ]] || target/release/portwatch --pin-path "$pin" unload >/dev/null 2>&1 || true
  for mount in "$root/sys/fs/bpf" "$root/sys" "$root/proc"; do
    ! mountpoint -q "$mount" || umount "$mount" || umount -l "$mount"
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
cp -a "$base" "$root"
rm "$root/.made"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /sys/fs/bpf "$root/sys/fs/bpf"
in_root() { chroot "$root" "$@"; }
# The root's files, but for the kernel's (proc, sys), /tmp, /run (systemd-analyze's runtime
# state) and man-db's index, which its trigger updates.
files() {
  (cd "$root" && find . -xdev \( -path ./tmp -o -path ./run -o -path ./var/cache/man \) -prune -o -print) | sort
}
files >"$work/before"

cp "$deb" "$root/tmp/portwatch.deb"
if in_root dpkg -i /tmp/portwatch.deb >"$out/dpkg-install.log" 2>&1; then
  ok
else
  cat "$out/dpkg-install.log" >&2
  fail "dpkg -i"
  finish
fi
rm "$root/tmp/portwatch.deb"

# Every file the package installs, with its mode; nothing else.
expected=$(
  cat <<EOF
755 /usr/sbin/portwatch
644 /etc/portwatch/portwatch.yaml
644 /etc/logrotate.d/portwatch
644 /usr/lib/systemd/system/portwatch.service
644 /usr/lib/systemd/system/portwatch-reset.service
644 /usr/lib/systemd/system/portwatch-reset.timer
644 /usr/lib/systemd/system/portwatch-serve.service
644 /usr/lib/systemd/system/portwatch-watch.service
644 /usr/share/man/man8/portwatch.8.gz
644 /usr/share/bash-completion/completions/portwatch
644 /usr/share/zsh/vendor-completions/_portwatch
644 /usr/share/fish/vendor_completions.d/portwatch.fish
644 /usr/share/doc/portwatch/README.md
644 /usr/share/doc/portwatch/bpffs-layout.md
644 /usr/share/doc/portwatch/BENCHMARKS.md
644 /usr/share/doc/portwatch/CONTRIBUTING.md
644 /usr/share/doc/portwatch/copyright
644 /usr/share/doc/portwatch/changelog.Debian.gz
644 /usr/share/doc/portwatch/examples/portwatch.cron
644 /usr/share/lintian/overrides/portwatch
$(for doc in docs/*.md; do echo "644 /usr/share/doc/portwatch/$doc"; done)
EOF
)
installed=$(in_root dpkg -L portwatch | while read -r f; do
  [[ -d $root$f ]] || in_root stat -c '%a %n' "$f"
done)
if [[ $(sort <<<"$installed") == "$(sort <<<"$expected")" ]]; then
  ok
else
  fail "the installed files and modes differ from what is expected (< expected, > installed):"
  diff <(sort <<<"$expected") <(sort <<<"$installed") >&2 || true
fi
if [[ $(in_root stat -c '%U:%G' /usr/sbin/portwatch /etc/portwatch/portwatch.yaml | sort -u) == root:root ]]; then ok; else fail "owners"; fi
conffiles=$(in_root dpkg-query -W -f='${Conffiles}\n' portwatch | awk 'NF { print $1 }' | sort)
if [[ $conffiles == $'/etc/logrotate.d/portwatch\n/etc/portwatch/portwatch.yaml' ]]; then ok; else fail "conffiles: $conffiles"; fi

# Enabled on install: the rotation timer only (docs/install.md). Nothing was started: no systemd
# runs in a chroot, and the maintainer scripts check for it.
enabled=$(cd "$root/etc/systemd/system" && find . -name 'portwatch*' | sort)
if [[ $enabled == ./timers.target.wants/portwatch-reset.timer ]]; then ok; else fail "enabled units: $enabled"; fi

units=(/usr/lib/systemd/system/portwatch{,-reset,-serve,-watch}.service /usr/lib/systemd/system/portwatch-reset.timer)
if grep -q /usr/local "${units[@]/#/$root}"; then fail "a unit names /usr/local"; else ok; fi
if verify=$(in_root systemd-analyze verify "${units[@]}" 2>&1) && [[ -z $verify ]]; then
  ok
else
  fail "systemd-analyze verify: $verify"
fi

if page=$(in_root env MANWIDTH=100 man -P cat portwatch 2>"$work/man.err") && [[ ! -s $work/man.err ]] &&
  grep -q '^PORTWATCH APPLY' <<<"$page"; then
  ok
else
  fail "man portwatch: $(head -c 300 "$work/man.err")"
fi
if [[ $(in_root bash -c 'source /usr/share/bash-completion/completions/portwatch && complete -p portwatch') == *'-F _portwatch portwatch' ]]; then
  ok
else
  fail "the bash completion does not load"
fi
if head -n 1 "$root/usr/share/zsh/vendor-completions/_portwatch" | grep -q '^#compdef portwatch' &&
  grep -q '^complete -c portwatch' "$root/usr/share/fish/vendor_completions.d/portwatch.fish"; then
  ok
else
  fail "the zsh or fish completion"
fi

if [[ $(in_root /usr/sbin/portwatch --version) == "portwatch ${version%-*}" ]]; then ok; else fail "--version"; fi
if in_root /usr/sbin/portwatch check >"$work/check.log" 2>&1; then ok; else fail "portwatch check: $(cat "$work/check.log")"; fi

# The shipped configuration, with the test's pin path as an operator's edit: it loads and attaches
# nothing. Then the removal drains and unloads it.
sed -i "s|^pin_path: .*|pin_path: $pin|" "$root/etc/portwatch/portwatch.yaml"
if in_root /usr/sbin/portwatch apply -f /etc/portwatch/portwatch.yaml >"$work/apply.log" 2>&1 &&
  attached=$(in_root /usr/sbin/portwatch --pin-path "$pin" status --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["attachments"]))') &&
  [[ $attached == 0 ]]; then
  ok
else
  fail "the shipped portwatch.yaml: $(cat "$work/apply.log") (attachments: ${attached:-?})"
fi

# The same package again, as an upgrade runs its scripts: the state and the edited conffile stay.
cp "$deb" "$root/tmp/portwatch.deb"
if in_root dpkg -i /tmp/portwatch.deb >"$out/dpkg-upgrade.log" 2>&1 && [[ -d $pin ]] &&
  grep -q "^pin_path: $pin\$" "$root/etc/portwatch/portwatch.yaml"; then
  ok
else
  fail "dpkg -i over the installed package: $(cat "$out/dpkg-upgrade.log")"
fi
rm "$root/tmp/portwatch.deb"

if in_root dpkg -r portwatch >"$out/dpkg-remove.log" 2>&1; then ok; else fail "dpkg -r: $(cat "$out/dpkg-remove.log")"; fi
if [[ ! -e $pin && $(wc -l <"$root/var/log/portwatch/portwatch.jsonl" 2>/dev/null) == 1 ]]; then
  ok
else
  fail "dpkg -r did not drain into /var/log/portwatch/portwatch.jsonl and unload $pin"
fi
if [[ ! -e $root/usr/sbin/portwatch && -e $root/etc/portwatch/portwatch.yaml ]]; then ok; else fail "dpkg -r: the binary stays or the configuration went"; fi

if in_root dpkg -P portwatch >"$out/dpkg-purge.log" 2>&1; then ok; else fail "dpkg -P: $(cat "$out/dpkg-purge.log")"; fi
# What purge leaves, by design: the log of what was counted.
left=$(diff "$work/before" <(files) | grep '^[<>]' || true)
if [[ $left == $'> ./var/log/portwatch\n> ./var/log/portwatch/portwatch.jsonl' ]]; then
  ok
else
  fail "after dpkg -P, the root differs from before the install by more than the log:"
  echo "$left" >&2
fi
finish
