#!/usr/bin/env bash
# The kernel matrix: portwatch's whole test suite on Debian 12's own kernels (default: 6.1, which
# has no TCX, and 6.12), each booted under qemu (TCG) with this machine's root read-only under a
# tmpfs overlay. Every test binary of the workspace that touches the kernel runs inside as root
# with CI=true, all in one boot per kernel (the checks of the source and the unit tests of pure logic run on
# the host only), and `portwatch check` runs on each kernel. One line per kernel and binary; exit code 1 if
# anything failed on any kernel. Logs stay under target/kernels/<release>/.
#
#     tests/kernels.sh [VERSION...]        VERSION: 6.1, 6.12 (a Debian 12 kernel series)
#
# What it needs (qemu, busybox, kmod, the kernel images) the bootstrap installs; the images are
# unpacked under target/kernels/cache and reused. The guest has no network device: test traffic
# stays in the namespaces the tests create inside it. Nothing is left running or mounted.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# The guest sees this machine's root, with fresh /proc, /sys, /dev and /run over it (/tmp stays,
# written to the overlay): the checkout must not be under those.
case $root/ in
  /proc/* | /sys/* | /dev/* | /run/*)
    echo "kernels: the checkout ($root) is under a directory the guest mounts over; move it" >&2
    exit 1
    ;;
esac
versions=("$@")
((${#versions[@]})) || versions=(6.1 6.12)
# Per boot: enough for the slowest binary under TCG, bounded.
BOOT_TIMEOUT=${PORTWATCH_KERNEL_TIMEOUT:-1200}
# PORTWATCH_KERNEL_TESTS=REGEX runs only the test binaries whose name matches (when debugging).

.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
out=$root/target/kernels
mkdir -p "$out"
# One line per version: VERSION PACKAGE RELEASE (a failure stops here, under set -e).
.ci/bootstrap kernels "$out/cache" "${versions[@]}" >"$out/kernels.txt"
mapfile -t kernels <"$out/kernels.txt"

# The test binaries, as `cargo test` builds them (the portwatch binary they drive included).
say() { printf 'kernels: %s\n' "$*" >&2; }
say "building the test binaries"
cargo test --workspace --locked --no-run --message-format=json 2>"$out/build.log" |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable"):
        kind = m["target"]["kind"][0]
        # tests/NAME.rs as NAME; the unit tests of a crate as CRATE-unit
        name = m["target"]["name"] + ("" if kind == "test" else "-unit")
        print(name, m["manifest_path"].rsplit("/", 1)[0], m["executable"])
' | sort >"$out/binaries.txt" || { cat "$out/build.log" >&2; exit 1; }
# Only binaries that hold tests (the benchmark and demo binaries have none).
binaries=()
while read -r name dir exe; do
  [[ -z ${PORTWATCH_KERNEL_TESTS:-} || $name =~ $PORTWATCH_KERNEL_TESTS ]] || continue
  # The benchmark harness's smoke run is a host check of the harness (tests/bench.sh), not of a
  # kernel: it runs in tests/run.sh only.
  if [[ $name == bench ]]; then
    say "bench: the benchmark harness's smoke run is host only (tests/run.sh runs it)"
    continue
  fi
  # Checks of the source and of logic with no system call in it: the same on every kernel, so run
  # on the host only (tests/run.sh), which keeps the matrix, and .ci/run, within CI's time.
  case $name in
    help | modules | fault_points | docs | portwatch-unit | portwatch_tests-unit)
      say "$name: no kernel in it (the source, --help, the docs' links, unit tests of pure logic): host only (tests/run.sh runs it)"
      continue
      ;;
    # The Kubernetes manifests: schema and rule checks of files; its one kernel test applies the
    # ConfigMap's portwatch.yaml, as deploy (which runs here) applies the example's on every kernel.
    kubernetes)
      say "$name: checks of the manifests: host only (tests/run.sh runs it)"
      continue
      ;;
  esac
  # Read whole (a `| grep -q` would close the pipe early, and pipefail would drop the binary).
  if [[ $("$exe" --list --format terse 2>/dev/null) == *': test'* ]]; then
    binaries+=("$name $dir $exe")
  fi
done <"$out/binaries.txt"
if ((${#binaries[@]} == 0)) && [[ -z ${PORTWATCH_KERNEL_TESTS:-} ]]; then
  say "no test binary with tests was built: see $out/build.log"
  exit 1
fi

qemus=()
cleanup() {
  for pid in "${qemus[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# The initramfs of one kernel: static busybox, the modules that reach the host's root (virtio,
# 9p, overlay; .xz ones unpacked), and /init.
initramfs() {
  local dir=$1 release=$2 img=$3 tmp
  tmp=$(mktemp -d)
  mkdir -p "$tmp"/{bin,sbin,proc,sys,dev,ro,rw,newroot,modules}
  cp /bin/busybox "$tmp/bin/busybox"
  # The kernel's module requests (a qdisc kind, veth, nf_tables...) run /sbin/modprobe in the
  # initramfs' root, not in the chroot: send them to the real modprobe (kmod) inside it.
  printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n' >"$tmp/sbin/modprobe"
  chmod +x "$tmp/sbin/modprobe"
  local order=()
  local m line path
  for m in virtio_pci 9pnet_virtio 9p overlay; do
    while read -r line; do
      [[ $line == insmod* ]] || continue
      path=$(awk '{print $2}' <<<"$line")
      [[ " ${order[*]} " == *" ${path##*/} "* ]] && continue
      case $path in
        *.xz) xz -dc "$path" >"$tmp/modules/$(basename "$path" .xz)"; order+=("$(basename "$path" .xz)") ;;
        *) cp "$path" "$tmp/modules/"; order+=("${path##*/}") ;;
      esac
    done < <(modprobe -d "$dir" -S "$release" --show-depends "$m")
  done
  printf '%s\n' "${order[@]}" >"$tmp/modules/order"
  cat >"$tmp/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in \$(cat /modules/order); do insmod /modules/\$m || echo "init: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /ro
mount -t tmpfs -o size=1G tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot
mkdir -p /newroot/pwshare
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /newroot/pwshare
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
ln -sf pts/ptmx /newroot/dev/ptmx
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
mkdir -p /newroot/usr/lib/modules
rm -rf /newroot/usr/lib/modules/$release
ln -s $dir/lib/modules/$release /newroot/usr/lib/modules/$release
chroot /newroot /bin/sh /pwshare/run.sh >/newroot/pwshare/out.log 2>&1
echo \$? >/newroot/pwshare/rc
sync
umount /newroot/pwshare
echo o >/proc/sysrq-trigger
sleep 10
EOF
  chmod +x "$tmp/init"
  (cd "$tmp" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$img"
  rm -rf "$tmp"
}

# The factor every bounded wait of the tests is multiplied by in the guest (PORTWATCH_WAIT_SCALE,
# tests/src/lib.rs `wait_scale`): 3 for the emulation, times how much of the machine other work
# takes as the boot starts (1 + the tasks running besides this one per CPU, sampled ten times over
# a second: 2 beside `stress-ng --cpu 2` on 2 CPUs), capped at 12. A busy machine makes the matrix
# slower, not red. PORTWATCH_WAIT_SCALE set by hand fixes it.
wait_scale() {
  if [[ -n ${PORTWATCH_WAIT_SCALE:-} ]]; then
    echo "$PORTWATCH_WAIT_SCALE"
    return
  fi
  local others=0 i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    # procs_running counts the awk that reads it.
    others=$((others + $(awk '/^procs_running/ { print $2 - 1 }' /proc/stat)))
    sleep 0.1
  done
  awk -v others="$others" -v cpus="$(nproc)" 'BEGIN { s = 3 * (1 + others / 10 / cpus); if (s > 12) s = 12; printf "%.1f\n", s }'
}

# Boots `dir`'s kernel and runs the shell `body` inside, after the tests' environment and a first
# line `kernel RELEASE, waits scaled by N` (which boot_started looks for); the body's output goes
# to share/out.log, its exit code to share/rc. Bounded by BOOT_TIMEOUT; with `watch` (a function),
# by BOOT_TIMEOUT of silence instead (no file under share written for that long), calling `watch`
# every few seconds while the guest runs.
boot() {
  local dir=$1 release=$2 img=$3 share=$4 body=$5 watch=${6:-} scale pid bound=$BOOT_TIMEOUT
  scale=$(wait_scale)
  rm -rf "$share"
  mkdir -p "$share"
  cat >"$share/run.sh" <<EOF
export CI=true HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUST_BACKTRACE=1
# The long fault and load tests run whole on the host (tests/run.sh); under emulation, several times
# slower, they make the same checks over fewer runs and seconds.
export PORTWATCH_CRASH_RUNS=${PORTWATCH_CRASH_RUNS:-20} PORTWATCH_CONCURRENCY_SECS=${PORTWATCH_CONCURRENCY_SECS:-20}
export PORTWATCH_HISTORY_RECORDS=${PORTWATCH_HISTORY_RECORDS:-60}
# Every bounded wait of the tests (and the alert test's intervals), scaled for an emulated kernel
# on a machine this busy (wait_scale, above).
export PORTWATCH_WAIT_SCALE=$scale
# The lock tests' counter entries (200,000 on the host): scrapes and resets over fewer, the same checks.
export PORTWATCH_LOCK_ENTRIES=${PORTWATCH_LOCK_ENTRIES:-20000}
first_line="kernel \$(uname -r), waits scaled by $scale"
echo "\$first_line"
$body
EOF
  [[ -z $watch ]] || bound=0 # no bound of its own: the watch below
  timeout --kill-after=10 "$bound" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 2G \
    -display none -monitor none -serial "file:$share/console.log" -no-reboot -nic none \
    -kernel "$dir/boot/vmlinuz-$release" -initrd "$img" \
    -append "console=ttyS0 panic=-1 quiet" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$share,mount_tag=share,security_model=none" </dev/null &
  pid=$!
  qemus+=("$pid")
  if [[ -n $watch ]]; then
    while kill -0 "$pid" 2>/dev/null; do
      sleep 5
      "$watch"
      if [[ -z $(find "$share" -type f -newermt "-$((BOOT_TIMEOUT + 60)) seconds" -print -quit) ]]; then
        say "nothing written under $share for $((BOOT_TIMEOUT + 60)) s: stopping the guest"
        pkill -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
      fi
    done
  fi
  wait "$pid" || true
}

# `boot`, and once more if the guest never reached the command (no out.log: the emulated kernel
# panicked or hung while booting, which TCG does now and then); a test that ran is never rerun.
boot_started() {
  local share=$4
  boot "$@"
  if ! grep -q '^kernel ' "$share/out.log" 2>/dev/null; then
    say "the guest did not start the command (see $share/console.log): booting once more"
    mv "$share/console.log" "$share.console-1.log" 2>/dev/null || true
    boot "$@"
  fi
}

# The line of one binary that ran, from its directory (out.log, rc), and the seconds it took; a
# failure points at `shown` (where the directory will be; default: where it is).
report() {
  local release=$1 name=$2 share=$3 secs=$4 shown=${5:-$3} rc passed fails skipped line scale
  rc=$(cat "$share/rc" 2>/dev/null || echo none)
  if [[ $name == check ]]; then
    if [[ $rc == 0 ]]; then
      printf '%-24s %-24s passed (the verifier accepts both programs)\n' "$release" "portwatch check"
    else
      printf '%-24s %-24s FAILED: see %s\n' "$release" "portwatch check" "$shown/out.log"
      failed=1
    fi
    return
  fi
  read -r passed fails < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { print p + 0, f + 0 }' "$share/out.log" 2>/dev/null || echo "0 0")
  skipped=$(grep -c '^SKIPPED' "$share/out.log" 2>/dev/null || true)
  skipped=${skipped:-0}
  # A skipped test returns early, so libtest counts it as passed: count it apart.
  passed=$((passed - skipped))
  line=$(printf '%-24s %-24s %3d passed, %d failed' "$release" "$name" "$passed" "$fails")
  ((skipped == 0)) || line+=", $skipped skipped ($(grep '^SKIPPED' "$share/out.log" | sed 's/^SKIPPED \([^:]*\):.*/\1/' | paste -sd' '))"
  scale=$(sed -n 's/^kernel .*, waits scaled by \(.*\)$/\1/p' "$share/out.log" 2>/dev/null | head -1)
  if [[ -n $scale && $scale != 3.0 ]]; then
    line+=" ($secs s, waits x$scale)"
  else
    line+=" ($secs s)"
  fi
  if [[ $rc != 0 ]]; then
    [[ $rc == none ]] && line+=" - did not finish (timeout or crash)"
    line+=": FAILED, see $shown/out.log"
    failed=1
  fi
  echo "$line"
}

# One boot runs portwatch check and every binary in turn (a boot costs several seconds under TCG),
# each under BOOT_TIMEOUT, with its output in batch/NAME/ (out.log, rc, secs). What the shared boot
# did not finish (a kernel that crashed or hung) gets a boot of its own afterwards.
batch_body='
tab=$(printf "\t")
while IFS="$tab" read -r name cwd command; do
  mkdir -p "/pwshare/$name"
  started=$(date +%s)
  (cd "$cwd" && echo "$first_line" && exec timeout --kill-after=10 '"$BOOT_TIMEOUT"' sh -c "exec $command") \
    >"/pwshare/$name/out.log" 2>&1
  echo $? >"/pwshare/$name/rc.part"
  echo $(($(date +%s) - started)) >"/pwshare/$name/secs"
  mv "/pwshare/$name/rc.part" "/pwshare/$name/rc"
  sync
done </pwshare/list'

# Prints the lines of the binaries of the shared boot that have finished since the last call.
reported=()
report_finished() {
  local name
  for name in "${names[@]}"; do
    [[ -e $batch/$name/rc && " ${reported[*]} " != *" $name "* ]] || continue
    report "$release" "$name" "$batch/$name" "$(cat "$batch/$name/secs" 2>/dev/null || echo '?')" "$logs/$name"
    reported+=("$name")
  done
}

failed=0
for entry in "${kernels[@]}"; do
  read -r version package release <<<"$entry"
  dir=$out/cache/$package
  logs=$out/$release
  mkdir -p "$logs"
  img=$logs/initramfs.img
  initramfs "$dir" "$release" "$img"
  say "$release ($package): portwatch check and ${#binaries[@]} test binaries, in one boot"

  batch=$logs/batch
  names=(check)
  list=$(printf 'check\t%s\t%s' "$root" "target/debug/portwatch check")
  for b in "${binaries[@]}"; do
    read -r name cwd exe <<<"$b"
    names+=("$name")
    list+=$'\n'$(printf '%s\t%s\t%s' "$name" "$cwd" "'$exe'")
  done
  reported=()
  # boot() empties the share first: the list goes in through the body's here-document.
  boot_started "$dir" "$release" "$img" "$batch" "cat >/pwshare/list <<'LIST'
$list
LIST
$batch_body" report_finished
  report_finished
  for name in "${names[@]}"; do
    rm -rf "${logs:?}/$name" "$logs/$name.batch.log"
    [[ ! -e $batch/$name ]] || mv "$batch/$name" "$logs/$name"
    [[ " ${reported[*]} " != *" $name "* ]] || continue
    # Not finished in the shared boot: a boot of its own (its partial output kept beside).
    [[ ! -e $logs/$name/out.log ]] || mv "$logs/$name/out.log" "$logs/$name.batch.log"
    say "$name did not finish in the shared boot (see $batch/console.log): booting for it alone"
    if [[ $name == check ]]; then
      cwd=$root command="target/debug/portwatch check"
    else
      for b in "${binaries[@]}"; do
        read -r n cwd exe <<<"$b"
        [[ $n != "$name" ]] || break
      done
      command="'$exe'"
    fi
    started=$SECONDS
    boot_started "$dir" "$release" "$img" "$logs/$name" "cd '$cwd'
$command"
    report "$release" "$name" "$logs/$name" "$((SECONDS - started))"
  done
done
exit "$failed"
