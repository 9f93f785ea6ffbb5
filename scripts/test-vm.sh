#!/usr/bin/env bash
# Boots each kernel of vagrant/kernels.txt under qemu with virtme-ng, over this
# machine's root file system, and runs the kernel-facing suite inside it.
# KVM where it works; otherwise TCG (slow: a bcc compile takes about 80 s).
# Arguments, if any, replace the default pytest selection (`-m vm tests`), e.g.
#   scripts/test-vm.sh tests/integration/test_iptables_traffic.py -m vm
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
export PATH="$venv/bin:$PATH"
say() { printf 'test-vm: %s\n' "$*"; }
# A fresh machine's package lists may be empty or stale: read them before installing.
apt_install() {
  apt-get update -qq >/dev/null  # image_for prints its answer on stdout
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
for p in qemu-system-x86 busybox-static; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
"$venv/bin/python" -c 'import virtme_ng' 2>/dev/null || "$venv/bin/python" -m pip install -q virtme-ng

# The image a line names: a path as it is; a package is installed when needed and
# gives its own /boot/vmlinuz-*, or, for a metapackage like linux-image-amd64,
# that of the kernel package it depends on.
image_for() {
  case "$1" in
    /*) echo "$1" ;;
    *)
      if ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; then
        say "installing $1" >&2
        apt_install "$1"
      fi
      local pkg=$1 image
      image=$(dpkg -L "$pkg" | grep '^/boot/vmlinuz-' || true)
      if [ -z "$image" ]; then
        pkg=$(dpkg-query -W -f='${Depends}' "$pkg" | tr ',' '\n' | grep -o '^ *linux-image-[^ ]*' | head -n 1 | tr -d ' ')
        image=$(dpkg -L "$pkg" | grep '^/boot/vmlinuz-')
      fi
      echo "$image" ;;
  esac
}

# Nested KVM fails or hangs on some hosts: try it once, briefly.
accel=(--disable-kvm)
if [ -w /dev/kvm ] && [ "${ISOEBPF_VM_KVM:-auto}" != off ]; then
  first=$(image_for "$(grep -v '^#' "$here/vagrant/kernels.txt" | grep . | head -n 1)")
  if timeout 60 vng --run "$first" --memory 1G --cpus 1 --exec 'echo kvm-works' 2>/dev/null | grep -q kvm-works; then
    accel=()
  fi
fi
say "acceleration: ${accel[*]:-kvm}"

selection=${*:-"-m vm tests"}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
results=()
status=0
while read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  image=$(image_for "$line")
  say "booting $image"
  started=$(date +%s)
  # stdin from /dev/null: the guest must not read the rest of kernels.txt.
  if vng --run "$image" "${accel[@]}" --memory 2G --cpus 2 --rwdir "$here" \
       --exec "cd '$here' && CI=${CI:-} '$venv/bin/python' -m pytest -p no:cacheprovider -q $selection" \
       </dev/null | tee "$log"; then
    verdict="passed in"
  else
    verdict="FAILED after"
    status=1
  fi
  results+=("$line ($image): $verdict $(( $(date +%s) - started )) s")
  while read -r taken; do results+=("  $taken"); done < <(grep '^path taken' "$log" || true)
done < "$here/vagrant/kernels.txt"
printf '%s\n' "${results[@]}"
exit $status
