# Helpers shared by the bench scripts; sourced, not run.

# have CMD: whether CMD is on the PATH (or in /usr/sbin, where nginx lives).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# install_packages PKG...: installs Debian packages (with sudo unless root).
install_packages() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
