#!/usr/bin/env bash
# A real Kubernetes API server (1.20.2) for tests, built from Debian bookworm's `kubernetes`
# source package, since no registry reachable here ships a kube-apiserver binary.
#
#   deploy/kube-testenv.sh install          build once; cached, a later run is a no-op
#   deploy/kube-testenv.sh start DIR [--with-controller-manager] [--with-scheduler]
#   deploy/kube-testenv.sh stop DIR
#
# `install` apt-installs golang-go, jq, rsync, dpkg-dev, etcd-server (+ etcd-client) and
# golang-github-modern-go-reflect2-dev; adds a deb-src line (in its own file) only if the pinned
# source version is not already known to apt; fetches that source into the cache; replaces the
# vendored reflect2 v1.0.1, which segfaults under Go 1.19 on the first custom-resource write, with
# Debian's 1.0.2; builds kube-apiserver, kube-controller-manager and kube-scheduler (6 to 13
# minutes on 2 cores, by load) and copies them to <cache>/bin/. Cache: ${SIDENODE_CACHE:-~/.cache/sidenode}
# /k8s-1.20.2/. Set KTE_PRUNE=1 to drop the source tree and Go build cache after a successful
# build (the binaries stay; about 2 GB freed).
#
# `start` runs etcd and kube-apiserver on 127.0.0.1 only, with data, keys and logs in DIR, and
# writes DIR/kubeconfig (admin token, group system:masters), DIR/env (ports, URL, token as shell
# variables) and DIR/pids. Ports are free random ones unless KTE_ETCD_PORT, KTE_ETCD_PEER_PORT,
# KTE_APISERVER_PORT (and KTE_KCM_PORT) are set. The service range is KTE_SERVICE_CIDR, default
# 198.18.128.0/17 (test-only addresses, apart from the node range 198.18.0.0/24).
# KTE_ADDRESS (default 127.0.0.1) is the address kube-apiserver binds and advertises (and its
# serving certificate names): run `start` inside a test's network namespace with an address of
# that namespace to let the namespace's other members reach it. etcd stays on 127.0.0.1.
# Privileged containers are allowed (`--allow-privileged=true`, as kubeadm and every managed
# cluster set it; the DaemonSet's mount-bpffs init container is privileged).
# KTE_CERT_SANS adds subjectAltNames to the serving certificate (e.g. `IP:198.18.128.1`).
# KTE_APISERVER_ARGS adds flags to kube-apiserver (word-split). Without --with-controller-manager
# the ServiceAccount admission plugin is off (nothing would create the `default` ServiceAccount and
# its token, so every Pod would be rejected); with it, admission is the default set.
# Limits of 1.20: EndpointSlice is discovery.k8s.io/v1beta1 only; no kubelet, so tests create
# Node/Pod objects and patch pod status themselves; Endpoints reject loopback addresses.
#
# `stop` ends the processes listed in DIR/pids (checked by their command line, so a reused pid is
# never hit) and removes DIR/pids; the data in DIR stays.
set -euo pipefail

K8S_SRC_PKG=kubernetes
K8S_SRC_VERSION='1.20.5+really1.20.2-1.1+deb12u1'
K8S_TREE_NAME='kubernetes-1.20.5+really1.20.2'
CACHE="${SIDENODE_CACHE:-$HOME/.cache/sidenode}/k8s-1.20.2"
BIN="$CACHE/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC_FILE=/etc/apt/sources.list.d/sidenode-kube-testenv-src.sources
DEB_MIRROR=http://deb.debian.org/debian
ETCD=/usr/bin/etcd

log() { printf '[kube-testenv] %s\n' "$*" >&2; }
die() { printf '[kube-testenv] ERROR: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '5,7p' "$0" | sed 's/^# *//' >&2
    exit 2
}

# ---------------------------------------------------------------------------------------- install

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

APT_UPDATED=0
apt_update_checked() {
    log "apt-get update"
    apt-get update -qq && APT_UPDATED=1
}
apt_update() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

ensure_packages() {
    local want=(golang-go jq rsync dpkg-dev golang-github-modern-go-reflect2-dev etcd-server)
    local missing=() p
    for p in "${want[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    # etcd-client (etcdctl) is handy for debugging but optional: only if the archive has it.
    if ! pkg_installed etcd-client && [[ ! -f "$CACHE/.no-etcd-client" ]]; then
        apt-cache show etcd-client >/dev/null 2>&1 || apt_update
        if apt-cache show etcd-client >/dev/null 2>&1; then
            missing+=(etcd-client)
        else
            log "etcd-client: not in the archive, skipped"
            mkdir -p "$CACHE" && touch "$CACHE/.no-etcd-client"
        fi
    fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages: all present"
        return
    fi
    apt_update
    log "apt-get install ${missing[*]}"
    # Keep any service start from the etcd-server package from grabbing 2379 (no init here
    # usually, but policy-rc.d is what Debian maintainer scripts ask).
    local added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || rc=$?
    [[ $added_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc == 0 ]] || die "apt-get install ${missing[*]} failed (exit $rc)"
}

src_version_known() {
    apt-cache showsrc "$K8S_SRC_PKG" 2>/dev/null | grep -qx "Version: $K8S_SRC_VERSION"
}

ensure_deb_src() {
    if src_version_known; then
        log "deb-src: $K8S_SRC_PKG $K8S_SRC_VERSION already known to apt"
        return
    fi
    if [[ ! -f $DEB_SRC_FILE ]]; then
        # apt refuses two entries for one mirror with different Signed-By values, so reuse the
        # keyring of the existing `deb` entry for the mirror, if it names one.
        local signed_by
        signed_by=$(awk -v uri="$DEB_MIRROR" '
            /^[[:space:]]*$/ { if (hit && sb != "") { print sb; exit } hit = 0; sb = ""; next }
            $1 == "URIs:" { for (i = 2; i <= NF; i++) if ($i == uri || $i == uri "/") hit = 1 }
            $1 == "Signed-By:" { sb = $2 }
            END { if (hit && sb != "") print sb }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
        if [[ -z $signed_by ]]; then
            signed_by=$(grep -hoE "^deb \[[^]]*signed-by=[^] ]+[^]]*\] $DEB_MIRROR/? " \
                /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -E 's/.*signed-by=([^] ]+).*/\1/' | head -n1 || true)
        fi
        log "deb-src: adding bookworm main from $DEB_MIRROR in $DEB_SRC_FILE${signed_by:+ (Signed-By $signed_by)}"
        {
            echo "Types: deb-src"
            echo "URIs: $DEB_MIRROR"
            echo "Suites: bookworm"
            echo "Components: main"
            if [[ -n $signed_by ]]; then echo "Signed-By: $signed_by"; fi
        } >"$DEB_SRC_FILE"
    fi
    APT_UPDATED=0
    if ! apt_update_checked; then
        rm -f "$DEB_SRC_FILE"
        die "apt-get update failed with $DEB_SRC_FILE; removed it again"
    fi
    src_version_known || die "apt has no source $K8S_SRC_PKG=$K8S_SRC_VERSION even after adding deb-src (apt-cache showsrc $K8S_SRC_PKG)"
}

fetch_source() {
    local tree="$CACHE/src/$K8S_TREE_NAME"
    if [[ -f "$CACHE/src/.fetched" && -d "$tree/vendor" ]]; then
        log "source: $tree (cached)"
        return
    fi
    ensure_deb_src
    local tmp="$CACHE/src.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    log "apt-get source $K8S_SRC_PKG=$K8S_SRC_VERSION (into $tmp)"
    # apt-get source as root cannot drop to the _apt user for a folder it does not own: fine.
    (cd "$tmp" && apt-get source -qq "$K8S_SRC_PKG=$K8S_SRC_VERSION" >"$tmp.log" 2>&1) ||
        die "apt-get source failed; see $tmp.log"
    [[ -d "$tmp/$K8S_TREE_NAME/vendor" ]] || die "apt-get source did not unpack $K8S_TREE_NAME with vendor/ (see $tmp.log)"
    rm -f "$tmp"/*.tar.* "$tmp"/*.dsc
    rm -rf "$CACHE/src"
    mv "$tmp" "$CACHE/src"
    mv "$tmp.log" "$CACHE/src/apt-get-source.log"
    touch "$CACHE/src/.fetched"
}

fix_reflect2() {
    local tree="$CACHE/src/$K8S_TREE_NAME"
    local dst="$tree/vendor/github.com/modern-go/reflect2"
    if [[ -f "$tree/.sidenode-reflect2-1.0.2" ]]; then
        log "reflect2: already replaced by Debian's 1.0.2"
        return
    fi
    [[ -d "$REFLECT2_SRC" ]] || die "$REFLECT2_SRC missing (package golang-github-modern-go-reflect2-dev)"
    [[ -d "$dst" ]] || die "$dst missing in the source tree"
    log "reflect2: replacing vendored v1.0.1 with $REFLECT2_SRC (1.0.2, without go.mod)"
    # -L: Debian's gocode folder may hold symlinks; vendor wants plain files.
    rsync -aL --delete --exclude go.mod --exclude go.sum "$REFLECT2_SRC/" "$dst/" ||
        die "rsync of reflect2 failed"
    touch "$tree/.sidenode-reflect2-1.0.2"
}

build_binaries() {
    local tree="$CACHE/src/$K8S_TREE_NAME"
    local gopath="$CACHE/gopath"
    mkdir -p "$gopath/src/k8s.io"
    ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
    local what="" b
    for b in "${BINARIES[@]}"; do what+="cmd/$b "; done
    log "go: $(go version)"
    log "make WHAT=\"${what% }\" (about 6 minutes on 2 cores; log: $CACHE/build.log)"
    local t0=$SECONDS
    (
        cd "$gopath/src/k8s.io/kubernetes"
        export GOPATH="$gopath" GOPROXY=off CGO_ENABLED=0 \
            GOCACHE="$CACHE/go-build" GOTOOLCHAIN=local KUBE_VERBOSE=1
        make WHAT="${what% }"
    ) >"$CACHE/build.log" 2>&1 || {
        tail -n 30 "$CACHE/build.log" >&2
        die "build failed; see $CACHE/build.log"
    }
    log "build: $((SECONDS - t0)) s"
    local out="$tree/_output/local/bin/linux/amd64"
    [[ -d $out ]] || out="$(dirname "$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1)")"
    mkdir -p "$BIN.tmp"
    for b in "${BINARIES[@]}"; do
        [[ -x "$out/$b" ]] || die "built binary $out/$b missing"
        cp "$out/$b" "$BIN.tmp/$b"
    done
    "$BIN.tmp/kube-apiserver" --version >/dev/null || die "the built kube-apiserver does not run"
    rm -rf "$BIN"
    mv "$BIN.tmp" "$BIN"
}

binaries_ok() {
    local b
    [[ -f "$BIN/.complete" ]] || return 1
    for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

cmd_install() {
    [[ $(id -u) == 0 ]] || die "install needs root (apt-get)"
    ensure_packages
    mkdir -p "$CACHE"
    if binaries_ok; then
        log "binaries: $BIN ($("$BIN/kube-apiserver" --version)) — nothing to build"
        return
    fi
    fetch_source
    fix_reflect2
    build_binaries
    touch "$BIN/.complete"
    if [[ ${KTE_PRUNE:-0} == 1 ]]; then
        log "KTE_PRUNE=1: removing the source tree and Go build cache"
        rm -rf "$CACHE/src" "$CACHE/gopath" "$CACHE/go-build"
    fi
    log "installed: $(ls "$BIN" | tr '\n' ' ')in $BIN ($("$BIN/kube-apiserver" --version))"
}

# ------------------------------------------------------------------------------------ start / stop

PICKED_PORTS=" "
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A port below the kernel's ephemeral range (outgoing connections take ports from that range,
# and a bind to one of them fails with "address already in use"), used by no socket at all.
free_port() {
    local p i low=32768
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    (( low > 12000 )) || low=32768
    for i in $(seq 1 200); do
        p=$((10000 + RANDOM % (low - 10000)))
        [[ $PICKED_PORTS == *" $p "* ]] && continue
        port_in_use "$p" && continue
        ss -Hatn "sport = :$p" 2>/dev/null | grep -q . && continue
        PICKED_PORTS+="$p "
        echo "$p"
        return
    done
    die "no free port found"
}

# alive NAME PID: the pid runs the expected binary (guards against pid reuse).
alive() {
    local name=$1 pid=$2
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}

wait_http() { # URL SECONDS [curl args...]
    local url=$1 secs=$2 i
    shift 2
    for i in $(seq 1 $((secs * 4))); do
        curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null && return 0
        sleep 0.25
    done
    return 1
}

make_pki() {
    local pki=$1
    [[ -f $pki/apiserver.crt && -f $pki/sa.key ]] && return
    log "pki: CA, apiserver serving cert (127.0.0.1, localhost), service-account key pair in $pki"
    (
        cd "$pki"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
            -subj "/CN=kube-testenv-ca" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
            -subj "/CN=kube-apiserver" 2>/dev/null
        printf '%s\n' "subjectAltName=IP:127.0.0.1,IP:${KTE_ADDRESS:-127.0.0.1},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local${KTE_CERT_SANS:+,$KTE_CERT_SANS}" \
            "extendedKeyUsage=serverAuth" "keyUsage=digitalSignature,keyEncipherment" >apiserver.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        chmod 600 ca.key apiserver.key sa.key
    ) || die "openssl failed in $pki"
}

cmd_start() {
    local dir="" with_kcm=0 with_sched=0 a
    for a in "$@"; do
        case $a in
        --with-controller-manager) with_kcm=1 ;;
        --with-scheduler) with_sched=1 ;;
        -*) die "unknown option $a" ;;
        *) [[ -z $dir ]] || die "one DIR only"; dir=$a ;;
        esac
    done
    [[ -n $dir ]] || usage
    binaries_ok || die "no binaries in $BIN: run '$0 install' first"
    [[ -x $ETCD ]] || die "$ETCD missing: run '$0 install' first (package etcd-server)"
    command -v curl >/dev/null || die "curl is needed"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/pids ]]; then
        local name pid running=0
        while read -r name pid; do if alive "$name" "$pid"; then running=1; fi; done <"$dir/pids"
        if [[ $running == 1 ]]; then die "already running from $dir/pids: '$0 stop $dir' first"; fi
        rm -f "$dir/pids"
    fi
    mkdir -p "$dir/etcd" "$dir/pki" "$dir/logs"
    make_pki "$dir/pki"

    local etcd_port=${KTE_ETCD_PORT:-$(free_port)}
    local etcd_peer=${KTE_ETCD_PEER_PORT:-$(free_port)}
    local api_port=${KTE_APISERVER_PORT:-$(free_port)}
    local cidr=${KTE_SERVICE_CIDR:-198.18.128.0/17}
    local p
    for p in "$etcd_port" "$etcd_peer" "$api_port"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use"
    done

    local token
    if [[ -s $dir/tokens.csv ]]; then
        token=$(cut -d, -f1 "$dir/tokens.csv" | head -n1)
    else
        token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
        printf '%s,admin,admin-uid,"system:masters"\n' "$token" >"$dir/tokens.csv"
        chmod 600 "$dir/tokens.csv"
    fi

    : >"$dir/pids"
    log "etcd on 127.0.0.1:$etcd_port (peer $etcd_peer), data in $dir/etcd"
    setsid "$ETCD" --name kte --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "kte=http://127.0.0.1:$etcd_peer" \
        --initial-cluster-state new --logger zap --log-outputs stderr \
        --quota-backend-bytes 1073741824 \
        </dev/null >"$dir/logs/etcd.log" 2>&1 &
    echo "etcd $!" >>"$dir/pids"
    wait_http "http://127.0.0.1:$etcd_port/health" 30 ||
        { tail -n 20 "$dir/logs/etcd.log" >&2; die "etcd not healthy after 30 s (log: $dir/logs/etcd.log)"; }

    local addr=${KTE_ADDRESS:-127.0.0.1}
    log "kube-apiserver on https://$addr:$api_port, services $cidr"
    local extra=()
    if [[ $with_kcm == 0 ]]; then
        # With no controller-manager nothing creates the `default` ServiceAccount nor its token,
        # and the ServiceAccount admission plugin then rejects every Pod.
        log "no controller-manager: ServiceAccount admission off, so bare Pod objects are accepted"
        extra+=(--disable-admission-plugins=ServiceAccount)
    fi
    if [[ -n ${KTE_APISERVER_ARGS:-} ]]; then
        local more=()
        read -r -a more <<<"$KTE_APISERVER_ARGS"
        extra+=("${more[@]}")
    fi
    local t0=$SECONDS
    setsid "$BIN/kube-apiserver" \
        --bind-address="$addr" --advertise-address="$addr" \
        --insecure-port=0 --secure-port="$api_port" \
        --cert-dir="$dir/pki" \
        --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
        --client-ca-file="$dir/pki/ca.crt" \
        --etcd-servers="http://127.0.0.1:$etcd_port" \
        --service-cluster-ip-range="$cidr" \
        --endpoint-reconciler-type=none \
        --authorization-mode=RBAC \
        --allow-privileged=true \
        --token-auth-file="$dir/tokens.csv" \
        --service-account-key-file="$dir/pki/sa.pub" \
        --service-account-signing-key-file="$dir/pki/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --api-audiences=https://kubernetes.default.svc.cluster.local \
        "${extra[@]}" \
        </dev/null >"$dir/logs/kube-apiserver.log" 2>&1 &
    echo "kube-apiserver $!" >>"$dir/pids"

    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-testenv
  cluster:
    server: https://$addr:$api_port
    certificate-authority-data: $(base64 -w0 <"$dir/pki/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: kube-testenv
  context:
    cluster: kube-testenv
    user: admin
current-context: kube-testenv
EOF
    chmod 600 "$dir/kubeconfig"

    local auth=(--cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token")
    if ! wait_http "https://$addr:$api_port/readyz" 90 "${auth[@]}"; then
        tail -n 30 "$dir/logs/kube-apiserver.log" >&2
        die "kube-apiserver not ready after 90 s (log: $dir/logs/kube-apiserver.log; '$0 stop $dir' to clean up)"
    fi
    log "kube-apiserver ready in $((SECONDS - t0)) s"

    local kcm_port=""
    if [[ $with_kcm == 1 ]]; then
        kcm_port=${KTE_KCM_PORT:-$(free_port)}
        log "kube-controller-manager (https://127.0.0.1:$kcm_port/healthz)"
        setsid "$BIN/kube-controller-manager" \
            --kubeconfig="$dir/kubeconfig" \
            --authentication-kubeconfig="$dir/kubeconfig" \
            --authorization-kubeconfig="$dir/kubeconfig" \
            --bind-address=127.0.0.1 --port=0 --secure-port="$kcm_port" \
            --cert-dir="$dir/pki/kcm" \
            --leader-elect=false \
            --use-service-account-credentials=false \
            --service-account-private-key-file="$dir/pki/sa.key" \
            --root-ca-file="$dir/pki/ca.crt" \
            --service-cluster-ip-range="$cidr" \
            --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-persistentvolume-binder,-attachdetach,-csrsigning' \
            </dev/null >"$dir/logs/kube-controller-manager.log" 2>&1 &
        echo "kube-controller-manager $!" >>"$dir/pids"
        if ! wait_http "https://127.0.0.1:$kcm_port/healthz" 60 -k; then
            tail -n 30 "$dir/logs/kube-controller-manager.log" >&2
            die "kube-controller-manager not healthy after 60 s (log: $dir/logs/kube-controller-manager.log)"
        fi
    fi

    local sched_port=""
    if [[ $with_sched == 1 ]]; then
        sched_port=${KTE_SCHED_PORT:-$(free_port)}
        log "kube-scheduler (https://127.0.0.1:$sched_port/healthz)"
        setsid "$BIN/kube-scheduler" \
            --kubeconfig="$dir/kubeconfig" \
            --authentication-kubeconfig="$dir/kubeconfig" \
            --authorization-kubeconfig="$dir/kubeconfig" \
            --bind-address=127.0.0.1 --port=0 --secure-port="$sched_port" \
            --cert-dir="$dir/pki/sched" \
            --leader-elect=false \
            </dev/null >"$dir/logs/kube-scheduler.log" 2>&1 &
        echo "kube-scheduler $!" >>"$dir/pids"
        if ! wait_http "https://127.0.0.1:$sched_port/healthz" 60 -k; then
            tail -n 30 "$dir/logs/kube-scheduler.log" >&2
            die "kube-scheduler not healthy after 60 s (log: $dir/logs/kube-scheduler.log)"
        fi
    fi

    cat >"$dir/env" <<EOF
KTE_ETCD_PORT=$etcd_port
KTE_ETCD_PEER_PORT=$etcd_peer
KTE_APISERVER_PORT=$api_port
KTE_APISERVER_URL=https://$addr:$api_port
KTE_KCM_PORT=$kcm_port
KTE_SCHED_PORT=$sched_port
KTE_SERVICE_CIDR=$cidr
KTE_TOKEN=$token
KUBECONFIG=$dir/kubeconfig
EOF
    log "started: KUBECONFIG=$dir/kubeconfig (pids in $dir/pids, logs in $dir/logs)"
    command -v kubectl >/dev/null || log "note: no kubectl on PATH"
}

cmd_stop() {
    local dir=${1:-}
    [[ -n $dir && $# == 1 ]] || usage
    if [[ ! -f $dir/pids ]]; then
        log "nothing to stop: no $dir/pids"
        return
    fi
    local entries=() name pid
    while read -r name pid; do
        if [[ -n $name ]]; then entries=("$name $pid" "${entries[@]}"); fi
    done <"$dir/pids"
    # Reverse start order: controller-manager, apiserver, then etcd.
    local e
    for e in "${entries[@]}"; do
        read -r name pid <<<"$e"
        if alive "$name" "$pid"; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            local i
            for i in $(seq 1 40); do alive "$name" "$pid" || break; sleep 0.25; done
            if alive "$name" "$pid"; then
                log "$name (pid $pid) still running after 10 s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        else
            log "$name (pid $pid) not running"
        fi
    done
    rm -f "$dir/pids"
}

# ------------------------------------------------------------------------------- real nodes

NODE_BIN="${SIDENODE_CACHE:-$HOME/.cache/sidenode}/k8s-1.20.2/node-bin"
NODE_PACKAGES=(containerd runc containernetworking-plugins buildah busybox-static conntrack iptables gcc libc6-dev)
# Paths kubelet 1.20, containerd, libcni, runc and buildah write whatever their flags say. Inside
# a node the folders are bind-mounted from the node's state folder (so nothing lands in them),
# but the mount points have to exist on the machine: the ones that did not exist before
# `real-up` are listed in DIR/created and removed by `real-down`.
HOST_MOUNTPOINTS=(/var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /etc/cni/net.d
    /opt/cni/bin /run/containerd /run/sidenode)
# Written outside any node (buildah's blob-info cache): removed by `real-down` when new.
# /opt/containerd: containerd's `opt` plugin, moved to the node's folder by its config; listed
# in case a containerd of another version ignores that.
HOST_WRITTEN=(/var/lib/containers /opt/containerd)
SANDBOX_IMAGE=k8s.gcr.io/pause:3.2
MESH_IMAGE=docker.io/sidenode/mesh-node:testenv
WORKLOAD_IMAGE=docker.io/sidenode/testpod:testenv
REAL_NET=198.18.0          # node i: .i, the fabric (apiserver, routes): .254
REAL_PODS=198.19           # node i's pods: 198.19.i.0/24
REAL_SERVICES=198.18.128.0/17
REAL_API_SERVICE_IP=198.18.128.1

ensure_node_packages() {
    local missing=() p
    for p in "${NODE_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "node packages: all present"
        return
    fi
    apt_update
    log "apt-get install ${missing[*]}"
    # containerd's maintainer script would start the machine's own containerd (and take
    # /run/containerd): policy-rc.d exit 101 forbids it.
    local added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || rc=$?
    [[ $added_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc == 0 ]] || die "apt-get install ${missing[*]} failed (exit $rc)"
    # Not at the next boot either (systemd hosts; best effort, quiet).
    if [[ " ${missing[*]} " == *" containerd "* ]]; then
        systemctl disable --now containerd >/dev/null 2>&1 || true
    fi
}

node_binaries_ok() {
    [[ -f "$NODE_BIN/.complete" && -x "$NODE_BIN/kubelet" && -x "$NODE_BIN/kube-proxy" && -x "$NODE_BIN/pause" ]]
}

build_node_binaries() {
    local tree="$CACHE/src/$K8S_TREE_NAME"
    local gopath="$CACHE/gopath"
    mkdir -p "$gopath/src/k8s.io"
    ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
    log "make WHAT=\"cmd/kubelet cmd/kube-proxy\" (about 1-5 minutes; log: $CACHE/build-node.log)"
    local t0=$SECONDS
    (
        cd "$gopath/src/k8s.io/kubernetes"
        export GOPATH="$gopath" GOPROXY=off CGO_ENABLED=0 \
            GOCACHE="$CACHE/go-build" GOTOOLCHAIN=local KUBE_VERBOSE=1
        make WHAT="cmd/kubelet cmd/kube-proxy"
    ) >"$CACHE/build-node.log" 2>&1 || {
        tail -n 30 "$CACHE/build-node.log" >&2
        die "build failed; see $CACHE/build-node.log"
    }
    log "build: $((SECONDS - t0)) s"
    local out="$tree/_output/local/bin/linux/amd64" b
    rm -rf "$NODE_BIN.tmp"
    mkdir -p "$NODE_BIN.tmp"
    for b in kubelet kube-proxy; do
        [[ -x "$out/$b" ]] || die "built binary $out/$b missing"
        cp "$out/$b" "$NODE_BIN.tmp/$b"
    done
    # The sandbox ("pause") binary from Kubernetes' own source, static, as upstream builds it.
    gcc -Os -Wall -static -DVERSION=v3.2-sidenode -o "$NODE_BIN.tmp/pause" \
        "$tree/build/pause/linux/pause.c" || die "gcc of $tree/build/pause/linux/pause.c failed"
    "$NODE_BIN.tmp/kubelet" --version >/dev/null || die "the built kubelet does not run"
    rm -rf "$NODE_BIN"
    mv "$NODE_BIN.tmp" "$NODE_BIN"
    touch "$NODE_BIN/.complete"
}

cmd_install_node() {
    ensure_node_packages
    if node_binaries_ok; then
        log "node binaries: $NODE_BIN ($("$NODE_BIN/kubelet" --version)) — nothing to build"
        return
    fi
    fetch_source
    fix_reflect2
    build_node_binaries
    log "installed: kubelet, kube-proxy, pause in $NODE_BIN"
}

# A scratch image NAME from FILES (host paths, copied to the same path) plus the dynamic
# libraries `ldd` lists for the executables among them; pushed to ARCHIVE (docker-archive).
build_image() { # NAME ARCHIVE ENTRYPOINT_JSON FILE...
    local name=$1 archive=$2 entry=$3
    shift 3
    local root="$RDIR/buildah" ctx="$RDIR/images/ctx-${name##*/}"
    ctx=${ctx%%:*}
    rm -rf "$ctx"
    mkdir -p "$ctx"
    local f lib
    for f in "$@"; do
        IFS='=' read -r src dst <<<"$f"
        dst=${dst:-$src}
        mkdir -p "$ctx$(dirname "$dst")"
        cp -L "$src" "$ctx$dst"
        if [[ -x $src ]] && ldd "$src" >/dev/null 2>&1; then
            for lib in $(ldd "$src" | grep -oE '/[^ ]+'); do
                [[ -e $ctx$lib ]] && continue
                mkdir -p "$ctx$(dirname "$lib")"
                cp -L "$lib" "$ctx$lib"
            done
        fi
    done
    local b=(buildah --root "$root/storage" --runroot "$root/run" --storage-driver vfs)
    local c
    c=$("${b[@]}" from scratch) || die "buildah from scratch failed"
    "${b[@]}" copy "$c" "$ctx" / >/dev/null || die "buildah copy failed"
    "${b[@]}" config --entrypoint "$entry" "$c" || die "buildah config failed"
    "${b[@]}" commit -q "$c" "$name" >/dev/null || die "buildah commit $name failed"
    "${b[@]}" rm "$c" >/dev/null
    rm -f "$archive"
    "${b[@]}" push -q "$name" "docker-archive:$archive:$name" || die "buildah push $name failed"
    "${b[@]}" rmi -f "$name" >/dev/null 2>&1 || true
    rm -rf "$ctx"
}

record_created() { # PATH...: mkdir -p, listing in $RDIR/created each folder that was missing
    local p
    for p in "$@"; do
        local missing=() q=$p
        while [[ ! -e $q ]]; do missing=("$q" "${missing[@]}"); q=$(dirname "$q"); done
        local m
        for m in "${missing[@]}"; do mkdir "$m" && echo "$m" >>"$RDIR/created"; done
    done
}

cgroup_v1_dirs() { # the v1 hierarchies mounted under /sys/fs/cgroup (not the unified one)
    awk '$9 == "cgroup" { print $5 }' /proc/self/mountinfo
}
cgroup_v2_dir() {
    awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo
}

make_node_cgroup() { # NAME: /NAME in every hierarchy (kubelet's --cgroup-root must exist in all)
    local name=$1 d
    for d in $(cgroup_v1_dirs) $(cgroup_v2_dir); do
        [[ -d $d/$name ]] && continue
        mkdir "$d/$name"
        echo "$d/$name" >>"$RDIR/cgroups"
        if [[ -f $d/cpuset.cpus ]]; then
            cat "$d/cpuset.cpus" >"$d/$name/cpuset.cpus"
            cat "$d/cpuset.mems" >"$d/$name/cpuset.mems"
        fi
    done
}

remove_cgroup_tree() { # DIR: rmdir depth first (only empty cgroups can go)
    [[ -d $1 ]] || return 0
    find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
    if [[ -d $1 ]]; then
        # Processes may take a moment to leave after a SIGKILL.
        local i
        for i in $(seq 1 40); do
            find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [[ -d $1 ]] || return 0
            sleep 0.25
        done
        log "WARNING: cgroup $1 could not be removed (processes left: $(cat "$1"/cgroup.procs 2>/dev/null | tr '\n' ' '))"
    fi
}

# The script PID 1 of a node's PID namespace runs (in the node's network namespace and a mount
# namespace of its own): private binds over the paths kubelet/containerd/libcni hard-code,
# machine-wide sysctls kubelet wants shown with the values it wants (never written), then
# containerd, kubelet and kube-proxy.
write_node_init() { # NODE_DIR NAME IP INDEX
    local nd=$1 name=$2 ip=$3 i=$4
    cat >"$nd/init.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
ND=$nd
exec >>"\$ND/logs/init.log" 2>&1
echo "node $name: init pid \$\$"
trap 'kill -TERM -- -1 2>/dev/null; exit 0' TERM INT
# Everything below stays in this mount namespace; shared inside it (kubelet's volume mounts and
# Bidirectional hostPaths need shared mounts) without any link to the machine's mounts.
mount --make-rshared /
# The machine's bpffs (if any) is not this node's: pins must not be shared between nodes. Node 1
# gets a private bpffs, node 2 none: the DaemonSet's mount-bpffs init container has to make the
# first shared and mount the second (the two cases of hosts it is written for).
while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done
if [[ \$(( $i % 2 )) == 1 ]]; then
    mount -t bpf bpf /sys/fs/bpf
    mount --make-private /sys/fs/bpf
fi
# /run/sidenode: the agent's CNI socket (DaemonSet hostPath /var/run/sidenode), one per node.
for p in /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /etc/cni/net.d /opt/cni/bin /run/containerd /run/netns /run/sidenode; do
    d="\$ND/host\$p"
    mkdir -p "\$d"
    mount --bind "\$d" "\$p"
done
# kubelet sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops and
# kernel.keys.root_max{keys,bytes} on the machine when they differ: show it the values it wants.
mkdir -p "\$ND/sysctl"
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \\
          kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    k=\${kv%%=*}; v=\${kv#*=}
    f="\$ND/sysctl/\${k//\//.}"
    echo "\$v" >"\$f"
    mount --bind "\$f" "/proc/sys/\$k"
done
# Anything else machine-wide under /proc/sys read-only; the network ones are this netns' own
# (net/ bound first, then the whole tree recursively, then only its top made read-only).
mount --bind /proc/sys/net /proc/sys/net
mount --rbind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
sysctl -qw net.ipv4.ip_forward=1

containerd --config "\$ND/containerd.toml" >"\$ND/logs/containerd.log" 2>&1 &
for _ in \$(seq 1 100); do [[ -S \$ND/containerd.sock ]] && break; sleep 0.1; done
for img in "\$ND"/../images/*.tar; do
    ctr -a "\$ND/containerd.sock" -n k8s.io images import "\$img" >/dev/null
done
touch "\$ND/images-imported"
$NODE_BIN/kubelet \\
    --kubeconfig="\$ND/kubeconfig" \\
    --container-runtime=remote \\
    --container-runtime-endpoint="unix://\$ND/containerd.sock" \\
    --image-service-endpoint="unix://\$ND/containerd.sock" \\
    --pod-infra-container-image=$SANDBOX_IMAGE \\
    --cgroup-driver=cgroupfs --cgroup-root=/$name \\
    --fail-swap-on=false \\
    --hostname-override=$name --node-ip=$ip --address=$ip \\
    --read-only-port=0 --healthz-bind-address=127.0.0.1 \\
    --network-plugin=cni --cni-conf-dir=/etc/cni/net.d --cni-bin-dir=/opt/cni/bin \\
    --root-dir=/var/lib/kubelet --cert-dir="\$ND/kubelet-pki" \\
    --volume-plugin-dir="\$ND/volume-plugins" \\
    --cluster-domain=cluster.local \\
    --anonymous-auth=true --authorization-mode=AlwaysAllow \\
    --eviction-hard='memory.available<1Mi,nodefs.available<1%,imagefs.available<1%' \\
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \\
    --serialize-image-pulls=false \\
    --node-status-update-frequency=2s \\
    >"\$ND/logs/kubelet.log" 2>&1 &
$NODE_BIN/kube-proxy \\
    --kubeconfig="\$ND/kubeconfig" \\
    --proxy-mode=iptables \\
    --hostname-override=$name --bind-address=$ip \\
    --cluster-cidr=$REAL_PODS.0.0/16 \\
    --oom-score-adj=0 \\
    --conntrack-max-per-core=0 \\
    --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \\
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \\
    >"\$ND/logs/kube-proxy.log" 2>&1 &
wait
EOF
    chmod +x "$nd/init.sh"
}

write_containerd_config() { # NODE_DIR
    local nd=$1
    cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  # default /opt/containerd, on the machine
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower a process' OOM score.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
EOF
}

cmd_real_up() {
    local dir="" prefix="" nodes=2 mesh_bin="" testpod_bin=""
    while [[ $# -gt 0 ]]; do
        case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --mesh-node) mesh_bin=$2; shift 2 ;;
        --testpod) testpod_bin=$2; shift 2 ;;
        -*) die "unknown option $1" ;;
        *) [[ -z $dir ]] || die "one DIR only"; dir=$1; shift ;;
        esac
    done
    [[ -n $dir && -n $prefix && -n $mesh_bin && -n $testpod_bin ]] ||
        die "usage: real-up DIR --prefix P --mesh-node BIN --testpod BIN [--nodes N]"
    [[ $prefix =~ ^[a-z0-9]{1,8}$ ]] || die "--prefix: 1 to 8 of [a-z0-9]"
    [[ $nodes =~ ^[1-9]$ ]] || die "--nodes: 1 to 9"
    [[ -x $mesh_bin ]] || die "--mesh-node $mesh_bin: not an executable"
    [[ -x $testpod_bin ]] || die "--testpod $testpod_bin: not an executable"
    node_binaries_ok || die "no kubelet/kube-proxy/pause in $NODE_BIN: run '$0 install --node' first"
    binaries_ok || die "no binaries in $BIN: run '$0 install' first"
    local p
    for p in containerd runc ctr buildah busybox conntrack iptables objcopy; do
        command -v $p >/dev/null || die "$p missing: run '$0 install --node' first"
    done
    [[ ! -e $dir/nodes ]] || die "$dir holds a cluster: '$0 real-down $dir' first"
    mkdir -p "$dir"
    RDIR=$(cd "$dir" && pwd)
    echo "$prefix" >"$RDIR/prefix"
    : >"$RDIR/created"
    : >"$RDIR/cgroups"
    : >"$RDIR/netns"
    : >"$RDIR/nodes"
    mkdir -p "$RDIR/images" "$RDIR/logs"
    local t0=$SECONDS

    # Host paths written whatever the flags say: mount points for the node's binds, buildah's cache.
    record_created "${HOST_MOUNTPOINTS[@]}"
    local h
    for h in "${HOST_WRITTEN[@]}"; do [[ -e $h ]] || echo "$h" >>"$RDIR/created"; done

    log "images (buildah, vfs, root $RDIR/buildah)"
    build_image "$SANDBOX_IMAGE" "$RDIR/images/pause.tar" '["/pause"]' "$NODE_BIN/pause=/pause"
    local mesh_stripped="$RDIR/images/mesh-node" tp_stripped="$RDIR/images/testpod"
    objcopy --strip-debug "$mesh_bin" "$mesh_stripped"
    objcopy --strip-debug "$testpod_bin" "$tp_stripped"
    printf 'hosts: files dns\n' >"$RDIR/images/nsswitch.conf"
    # The CNI plugin (sidenode-cni) goes next to mesh-node, as in deploy/Dockerfile: the
    # DaemonSet's install-cni copies it from there into the node's CNI bin dir.
    local cni_bin extra=()
    cni_bin="$(dirname "$mesh_bin")/sidenode-cni"
    if [[ -x $cni_bin ]]; then
        objcopy --strip-debug "$cni_bin" "$RDIR/images/sidenode-cni"
        extra+=("$RDIR/images/sidenode-cni=/usr/local/bin/sidenode-cni")
    else
        log "WARNING: no $cni_bin: the mesh-node image has no CNI plugin"
    fi
    build_image "$MESH_IMAGE" "$RDIR/images/mesh-node.tar" '["/usr/local/bin/mesh-node"]' \
        "$mesh_stripped=/usr/local/bin/mesh-node" /etc/ssl/certs/ca-certificates.crt \
        "$RDIR/images/nsswitch.conf=/etc/nsswitch.conf" "${extra[@]}"
    rm -f "$RDIR/images/sidenode-cni"
    build_image "$WORKLOAD_IMAGE" "$RDIR/images/testpod.tar" '["/bin/sh"]' \
        "$tp_stripped=/usr/local/bin/testpod" /bin/busybox=/bin/busybox \
        "$RDIR/images/nsswitch.conf=/etc/nsswitch.conf"
    rm -rf "$RDIR/buildah" "$mesh_stripped" "$tp_stripped"
    log "images built in $((SECONDS - t0)) s"

    # Network: <p>-net holds the bridge, the apiserver and the routes between nodes' pod ranges.
    local fab="$prefix-net"
    ip netns add "$fab" && echo "$fab" >>"$RDIR/netns"
    ip -n "$fab" link set lo up
    ip -n "$fab" link add br0 type bridge
    ip -n "$fab" addr add "$REAL_NET.254/24" dev br0
    ip -n "$fab" link set br0 up
    ip netns exec "$fab" sysctl -qw net.ipv4.ip_forward=1
    local i
    for i in $(seq 1 "$nodes"); do
        local ns="$prefix-n$i"
        ip netns add "$ns" && echo "$ns" >>"$RDIR/netns"
        ip -n "$ns" link set lo up
        ip -n "$fab" link add "v$i" type veth peer name eth0 netns "$ns"
        ip -n "$fab" link set "v$i" master br0 up
        ip -n "$ns" addr add "$REAL_NET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default via "$REAL_NET.254"
        ip -n "$fab" route add "$REAL_PODS.$i.0/24" via "$REAL_NET.$i"
    done

    log "kube-apiserver, controller-manager, scheduler in $fab on $REAL_NET.254"
    KTE_ADDRESS="$REAL_NET.254" KTE_CERT_SANS="IP:$REAL_API_SERVICE_IP" \
        KTE_SERVICE_CIDR="$REAL_SERVICES" \
        KTE_APISERVER_ARGS="--endpoint-reconciler-type=lease --kubelet-preferred-address-types=InternalIP,Hostname" \
        nsenter --net="/var/run/netns/$fab" -- "$0" start "$RDIR/api" --with-controller-manager --with-scheduler

    for i in $(seq 1 "$nodes"); do
        local ns="$prefix-n$i" nd="$RDIR/n$i"
        mkdir -p "$nd/logs" "$nd/host/etc/cni/net.d" "$nd/volume-plugins"
        make_node_cgroup "$ns"
        cp "$RDIR/api/kubeconfig" "$nd/kubeconfig"
        cat >"$nd/host/etc/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$prefix",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$REAL_PODS.$i.0/24" }]],
                "routes": [{ "dst": "0.0.0.0/0" }] }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
        # The node's /opt/cni/bin (where the DaemonSet's install-cni adds sidenode-cni): Debian's
        # plugins linked in.
        mkdir -p "$nd/host/opt/cni/bin"
        for b in /usr/lib/cni/*; do ln -sf "$b" "$nd/host/opt/cni/bin/"; done
        write_containerd_config "$nd"
        write_node_init "$nd" "$ns" "$REAL_NET.$i" "$i"
        # PID 1 of a PID namespace of its own: killing it ends every process of the node.
        setsid nsenter --net="/var/run/netns/$ns" -- \
            unshare --mount --pid --fork --kill-child --mount-proc --propagation private \
            "$nd/init.sh" </dev/null >>"$RDIR/logs/unshare-n$i.log" 2>&1 &
        echo "$ns $!" >>"$RDIR/nodes"
    done

    local kc=(nsenter --net="/var/run/netns/$fab" -- kubectl --kubeconfig "$RDIR/api/kubeconfig")
    log "waiting for $nodes node(s) Ready"
    local ready=0 n name pid
    for n in $(seq 1 240); do
        local dead=""
        while read -r name pid; do alive unshare "$pid" || dead+="$name "; done <"$RDIR/nodes"
        if [[ -n $dead ]]; then
            for i in $(seq 1 "$nodes"); do tail -n 5 "$RDIR/n$i/logs/"*.log >&2 || true; done
            die "node(s) $dead stopped (logs: $RDIR/n*/logs)"
        fi
        ready=$("${kc[@]}" get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True || true)
        [[ $ready == "$nodes" ]] && break
        sleep 0.5
    done
    if [[ $ready != "$nodes" ]]; then
        for i in $(seq 1 "$nodes"); do tail -n 15 "$RDIR/n$i/logs/kubelet.log" >&2 || true; done
        die "$ready of $nodes nodes Ready after 120 s (logs: $RDIR/n*/logs)"
    fi
    # No node-lifecycle controller here: nothing else removes the start-up taint.
    "${kc[@]}" taint nodes --all node.kubernetes.io/not-ready- >/dev/null 2>&1 || true
    for i in $(seq 1 "$nodes"); do
        for n in $(seq 1 100); do [[ -f $RDIR/n$i/images-imported ]] && break; sleep 0.2; done
    done
    log "cluster $prefix up in $((SECONDS - t0)) s: KUBECONFIG=$RDIR/api/kubeconfig (use it inside 'nsenter --net=/var/run/netns/$fab')"
}

cmd_real_down() {
    local dir=${1:-}
    [[ -n $dir && $# == 1 ]] || usage
    [[ -d $dir ]] || { log "nothing to stop: no $dir"; return; }
    RDIR=$(cd "$dir" && pwd)
    local name pid
    if [[ -f $RDIR/nodes ]]; then
        while read -r name pid; do
            [[ -n $pid ]] || continue
            # unshare --kill-child: killing it SIGKILLs the node's PID 1, and with it every
            # process of the node's PID namespace (containerd, shims, kubelet, pods).
            if alive unshare "$pid"; then
                log "stopping node $name (pid $pid)"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$RDIR/nodes"
        local i
        for i in $(seq 1 40); do
            local any=0
            while read -r name pid; do [[ -n $pid ]] && alive unshare "$pid" && any=1; done <"$RDIR/nodes"
            [[ $any == 0 ]] && break
            sleep 0.25
        done
    fi
    [[ -d $RDIR/api ]] && "$0" stop "$RDIR/api" || true
    if [[ -f $RDIR/cgroups ]]; then
        local cg
        while read -r cg; do [[ -n $cg ]] && remove_cgroup_tree "$cg"; done <"$RDIR/cgroups"
    fi
    if [[ -f $RDIR/netns ]]; then
        local ns
        while read -r ns; do [[ -n $ns ]] && ip netns del "$ns" 2>/dev/null || true; done <"$RDIR/netns"
    fi
    if [[ -f $RDIR/created ]]; then
        # Deepest first; folders only when empty (something else may have started using them).
        local c
        tac "$RDIR/created" | while read -r c; do
            [[ -n $c && -e $c ]] || continue
            case $c in
            /var/lib/containers | /opt/containerd) rm -rf "$c" ;;
            *) rmdir "$c" 2>/dev/null || log "left $c (not empty)" ;;
            esac
        done
    fi
    # Overlay snapshots hold read-only files and nothing is mounted any more: plain removal.
    rm -rf "$RDIR"
    log "removed $RDIR"
}

case ${1:-} in
install)
    shift
    if [[ ${1:-} == --node ]]; then
        shift; [[ $# == 0 ]] || usage
        [[ $(id -u) == 0 ]] || die "install needs root (apt-get)"
        ensure_packages; mkdir -p "$CACHE"
        binaries_ok || { fetch_source; fix_reflect2; build_binaries; touch "$BIN/.complete"; }
        cmd_install_node
    else
        [[ $# == 0 ]] || usage; cmd_install
    fi ;;
real-up) shift; cmd_real_up "$@" ;;
real-down) shift; cmd_real_down "$@" ;;
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
*) usage ;;
esac
