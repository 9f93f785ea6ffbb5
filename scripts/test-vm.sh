#!/usr/bin/env bash
# Boots each kernel of vagrant/kernels.txt under qemu with virtme-ng, over this
# machine's root file system, and runs the kernel-facing suite inside it.
# KVM where it works; otherwise TCG (slow: a bcc compile takes about 80 s).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
export PATH="$venv/bin:$PATH"
say() { printf 'test-vm: %s\n' "$*"; }

missing=()
for p in qemu-system-x86 busybox-static; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$venv/bin/python" -c 'import virtme_ng' 2>/dev/null || "$venv/bin/python" -m pip install -q virtme-ng

# The image a line names: install a package when needed, then take its newest vmlinuz.
image_for() {
  case "$1" in
    /*) echo "$1" ;;
    *)
      if ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; then
        say "installing $1" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
      fi
      ls /boot/vmlinuz-* | grep -v "$(uname -r)" | sort -V | tail -n 1 ;;
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

results=()
status=0
while read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  image=$(image_for "$line")
  say "booting $image"
  started=$(date +%s)
  if vng --run "$image" "${accel[@]}" --memory 2G --cpus 2 --rwdir "$here" \
       --exec "cd '$here' && CI=${CI:-} '$venv/bin/python' -m pytest -m vm -p no:cacheprovider -q tests"; then
    results+=("$line ($image): passed in $(( $(date +%s) - started )) s")
  else
    results+=("$line ($image): FAILED after $(( $(date +%s) - started )) s")
    status=1
  fi
done < "$here/vagrant/kernels.txt"
printf '%s\n' "${results[@]}"
exit $status
