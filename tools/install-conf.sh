#!/bin/sh
# meson install: the documented config goes to SYSCONFDIR/capd/capd.conf unless
# one is there already. An edited config survives a reinstall (as dpkg keeps
# conffiles); the shipped one then lands beside it as capd.conf.dist.
set -eu
src=$1
dir=${DESTDIR:-}$2
mkdir -p "$dir"
if [ -e "$dir/capd.conf" ]; then
	cp "$src" "$dir/capd.conf.dist"
	echo "capd: kept $dir/capd.conf; the shipped one is $dir/capd.conf.dist"
else
	cp "$src" "$dir/capd.conf"
	chmod 0644 "$dir/capd.conf"
fi
