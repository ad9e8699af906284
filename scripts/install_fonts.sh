#!/usr/bin/env bash
# Installs the free CJK font Debian packages that `lce-tf data glyphs` renders its demo and
# benchmark dataset from (docs/design.md, "Demo and benchmark data"). Each package is a few MB.
#
#   bash scripts/install_fonts.sh           # install what is missing (needs root and apt-get)
#   bash scripts/install_fonts.sh --check   # only report; exit 0 when all are installed, else 2
#
# Exit codes: 0 all fonts installed (now or before); 1 apt-get failed; 2 fonts are missing and this
# script cannot install them (not root, no apt-get, or --check): it prints the command to run.
# Without these fonts, pass your own image folders to lce-tf instead (root/<class>/<image>.png).
set -u

# The packages docs/design.md measured (twenty regular faces sharing 2,064 characters of U+4E00-U+9FFF),
# plus four cheap extra designs (2-12 MB each) that keep the set of characters common to all fonts
# above 3,000 (checked on Debian 12 with lce_tf.glyphs): BIZ UD Mincho, cwTeX HeiBold, Motoya L
# Cedar, Aoyagi Kouzan T. lce_tf.glyphs drops near-duplicate designs by rendering, so some of these
# are installed but not used (bkai00mp, gkai00mp and cwTeX Kai are the AR PL UKai design).
# Left out on purpose: fonts-noto-cjk (~90 MB), fonts-lxgw-wenkai (~100 MB), fonts-cns11643-*
# (~140 MB each), near-duplicates (Takao = IPA, IPAex = IPA kanji, Droid Fallback = WenQuanYi
# Micro Hei, Motoya L Maruberi = Motoya L Cedar with rounded ends) and GB-only / Big5-only subsets
# (arphic gbsn00lp / bsmi00lp) that would shrink the set of characters every font shares.
PACKAGES=(
  fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-gkai00mp
  fonts-wqy-zenhei fonts-wqy-microhei
  fonts-ipafont-gothic fonts-ipafont-mincho
  fonts-seto fonts-cwtex-kai fonts-cwtex-ming fonts-cwtex-heib
  fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-vlgothic fonts-kiloji
  fonts-aoyagi-soseki fonts-aoyagi-kouzan-t fonts-kouzan-mouhitsu fonts-yusei-magic
  fonts-morisawa-bizud-gothic fonts-morisawa-bizud-mincho
  fonts-motoya-l-cedar
)

check_only=0
case "${1:-}" in
  "") ;;
  --check) check_only=1 ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: unknown argument '$1' (expected --check or nothing)" >&2; exit 2 ;;
esac

# Packages not installed yet. dpkg-query is local and fast: no apt-get update when nothing is missing.
missing_packages() {
  local p status
  for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || echo "$p"
  done
}

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install_fonts: dpkg-query not found (not a Debian/Ubuntu system)." >&2
  echo "Install free CJK fonts with your system's package manager into /usr/share/fonts," >&2
  echo "or pass your own image folders (root/<class>/<image>.png) to lce-tf instead." >&2
  exit 2
fi

mapfile -t missing < <(missing_packages)
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_fonts: all ${#PACKAGES[@]} CJK font packages are already installed."
  exit 0
fi

print_manual() {
  echo "install_fonts: ${#missing[@]} of ${#PACKAGES[@]} CJK font packages are missing. Install them with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "or pass your own image folders (root/<class>/<image>.png) to lce-tf instead." >&2
}

if [ "$check_only" -eq 1 ] || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
  print_manual
  exit 2
fi

# Packages apt knows about (has an installation candidate). Refresh the package lists only when some
# missing package is unknown, so a machine with fresh lists installs without a network round trip.
installable() {
  local p cand
  for p in "$@"; do
    cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then echo "$p"; fi
  done
}

mapfile -t known < <(installable "${missing[@]}")
if [ "${#known[@]}" -lt "${#missing[@]}" ]; then
  echo "install_fonts: refreshing package lists (apt-get update)"
  apt-get update -qq || echo "install_fonts: warning: apt-get update failed; using the current package lists" >&2
  mapfile -t known < <(installable "${missing[@]}")
fi

for p in "${missing[@]}"; do
  if [[ " ${known[*]} " != *" $p "* ]]; then
    echo "install_fonts: warning: apt does not know package '$p'; skipping it" >&2
  fi
done
if [ "${#known[@]}" -eq 0 ]; then
  echo "install_fonts: none of the missing packages is known to apt." >&2
  print_manual
  exit 2
fi

echo "install_fonts: installing ${#known[@]} package(s): ${known[*]}"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${known[@]}"; then
  echo "install_fonts: error: apt-get install failed (see the messages above)" >&2
  exit 1
fi

mapfile -t missing < <(missing_packages)
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_fonts: all ${#PACKAGES[@]} CJK font packages are installed."
else
  echo "install_fonts: installed what apt knows; still missing: ${missing[*]}" >&2
fi
exit 0
