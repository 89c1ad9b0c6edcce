#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (Debian trixie's libonnxruntime-dev: ORT_API_VERSION 21,
# onnxruntime_lite_custom_op.h) without installing anything: a private apt state (own sources
# list, lists, cache and status) downloads the .deb, and only its include/ folder is unpacked.
# The wheels carry no headers; installing the package from trixie would upgrade libc.
#   usage: fetch_headers.sh DEST      (headers end up in DEST/include/onnxruntime)
set -euo pipefail
dest=$(realpath -m "${1:?usage: fetch_headers.sh DEST}")
if [ -f "$dest/include/onnxruntime/onnxruntime_lite_custom_op.h" ]; then exit 0; fi
state="$dest/apt"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/etc/preferences.d" "$state/deb"
: > "$state/status"
# This machine's Debian mirror (from /etc/apt/sources.list*), suite trixie.
uri=$(grep -hoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
      /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
uri=${uri:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""; [ -f "$keyring" ] && signed="[signed-by=$keyring]"
echo "deb $signed ${uri%/} trixie main" > "$state/etc/sources.list"
opts=(-o "Dir::State=$state" -o "Dir::State::Lists=$state/lists" -o "Dir::State::status=$state/status"
      -o "Dir::Etc::SourceList=$state/etc/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$state/etc/preferences.d"
      -o "Dir::Cache=$state/cache" -o "APT::Architecture=amd64" -o "Debug::NoLocking=1"
      -o "APT::Sandbox::User=root" -q)
apt-get "${opts[@]}" update >/dev/null
(cd "$state/deb" && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null)
deb=$(ls "$state/deb"/libonnxruntime-dev_*.deb | head -n1)
dpkg-deb -x "$deb" "$state/unpacked"
mkdir -p "$dest/include"
rm -rf "$dest/include/onnxruntime"
cp -r "$state/unpacked/usr/include/onnxruntime" "$dest/include/onnxruntime"
rm -rf "$state/unpacked"
echo "ONNX Runtime headers: $dest/include/onnxruntime ($(basename "$deb"))"
