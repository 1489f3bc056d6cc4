#!/usr/bin/env bash
# Bring up (or stop, or inspect) a real single-node Slurm cluster on this Debian/Ubuntu machine.
#
#   sudo bash tools/slurm_local_cluster.sh up       # install if missing, configure, start; idempotent
#   sudo bash tools/slurm_local_cluster.sh status   # daemons, sinfo, accounts
#   sudo bash tools/slurm_local_cluster.sh qos      # only (re)create the test QoS hpcvp_test (no restart)
#   sudo bash tools/slurm_local_cluster.sh stop     # stop slurmd, slurmctld, slurmdbd, mariadb, munged
#
# What "up" makes (the hpcvp tests and the `slurm-local` profile in hpcvp/cluster/profiles.json expect it):
#   - ClusterName=hpcvp, one node named after `hostname -s` with all its CPUs and ~90% of its memory,
#     no GPUs: hpcvp runs one CPU task per requested "GPU" with the gloo backend.
#   - partitions: `cpu` (default, no time limit) and `gpu` (MaxTime=01:00:00, so the launcher's
#     time-limit pre-flight has a limit to check against). Node feature `cpu` for --constraint.
#   - accounting through slurmdbd on MariaDB (sacct shows REQUEUED/PREEMPTED/...), associations enforced,
#     accounts pr_000_general (Greene-style) and torch_pr_000 (Torch-style) for root and the invoking user,
#     each allowed the QoS `normal` and `hpcvp_test` (for --qos).
#   - AuthInfo=cred_expire=10 so that a requeued job may start again after ~15 s instead of ~2 min.
#
#   sudo bash tools/slurm_local_cluster.sh up --nodes 2     # a second, two-node cluster (see below)
#   sudo bash tools/slurm_local_cluster.sh down --nodes 2   # stop it, remove its namespaces/links
#
# "up --nodes 2" leaves the cluster above alone and adds ClusterName=hpcvp2 (SLURM_CONF=/etc/slurm-2node/slurm.conf):
#   its own slurmctld (port 6827, 10.213.0.1 on bridge hpcvp2br) registered in the same slurmdbd with
#   the same accounts, and nodes hpcvp2n1 (10.213.0.11) and hpcvp2n2 (10.213.0.12): one slurmd each
#   in its own network + UTS namespace (netns hpcvp2-<node>), names in /etc/hosts, munge shared,
#   $SLURM_TMPDIR=/var/tmp/hpcvp2/<node>/<job id> from a TaskProlog. stop/status/down take --nodes 2.
#
# Environment knobs: HPCVP_SLURM_CLUSTER_NAME (default hpcvp), HPCVP_SLURM_EXTRA_USERS (space-separated
# users to add to the accounts besides root and $SUDO_USER), HPCVP_SLURM_DB_PASSWORD.
# Daemons are started directly (no systemd needed: containers and CI VMs have none); logs go to
# /var/log/slurm/*.log and /var/log/mysql-hpcvp.log.
set -euo pipefail

CLUSTER_NAME="${HPCVP_SLURM_CLUSTER_NAME:-hpcvp}"
ACCOUNTS=(pr_000_general torch_pr_000)
TEST_QOS=hpcvp_test
DB_PASSWORD="${HPCVP_SLURM_DB_PASSWORD:-hpcvp-slurmdbd}"
ETC=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { printf 'slurm_local_cluster: %s\n' "$*"; }
die() { printf 'slurm_local_cluster: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    # Re-run the whole script as root, keeping the caller's name so it gets Slurm accounts too.
    command -v sudo >/dev/null || die "run as root (no sudo here)"
    exec sudo --preserve-env=HPCVP_SLURM_CLUSTER_NAME,HPCVP_SLURM_EXTRA_USERS,HPCVP_SLURM_DB_PASSWORD \
        SUDO_USER="$(id -un)" bash "$0" "$@"
fi

# ---------------------------------------------------------------------------------------------
install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get: install them by hand"
    say "installing ${missing[*]} (apt-get, noninteractive)"
    # policy-rc.d=101 keeps the packages' own service scripts from starting half-configured daemons.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the process named in the file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {  # running NAME -> 0 when a process with exactly this command name runs
    pgrep -x "$1" >/dev/null 2>&1
}

stop_daemon() {  # stop_daemon NAME [PIDFILE]
    # slurmctld and slurmd are found through their pidfile only: the two-node cluster runs a second
    # slurmctld and more slurmds, which a lookup by name (pgrep -x) would find as well.
    local name="$1" pidfile="${2:-}" pid=""
    if [ -n "$pidfile" ] && pid_alive "$pidfile"; then
        pid="$(cat "$pidfile")"
    elif [ "$name" != slurmd ] && [ "$name" != slurmctld ]; then
        pid="$(pgrep -x "$name" | head -n1 || true)"
    fi
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $name (pid $pid)"; return 0; }
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $name (pid $pid) after 10 s"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"; shift 2
    for _ in $(seq 1 $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "$what did not come up within ${seconds}s (see $LOG_DIR and the daemon logs)"
}

# write_if_changed PATH MODE CONTENT -> returns 0 when the file changed
write_if_changed() {
    local path="$1" mode="$2" content="$3" tmp
    if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
        chmod "$mode" "$path"
        return 1
    fi
    tmp="$(mktemp "$path.XXXXXX")"
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    say "wrote $path"
    return 0
}

# ---------------------------------------------------------------------------------------------
ensure_hostname_resolves() {
    # Jobs find rank 0 through the node name (SLURM_JOB_NODELIST): it must resolve.
    local host
    host="$(hostname -s)"
    if ! getent hosts "$host" >/dev/null 2>&1; then
        printf '127.0.0.1 %s\n' "$host" >>/etc/hosts
        say "added '127.0.0.1 $host' to /etc/hosts (the node name must resolve)"
    fi
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        say "created /etc/munge/munge.key"
    fi
    # munged refuses to start unless its directories belong to the munge user.
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0711 /var/lib/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    if running munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    stop_daemon munged /run/munge/munged.pid
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged sh -c 'munge -n | unmunge'
    say "munged running"
}

start_mariadb() {
    local datadir=/var/lib/mysql
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [ ! -d "$datadir/mysql" ]; then
        say "initialising MariaDB data directory"
        mariadb-install-db --user=mysql --datadir="$datadir" >/var/log/mysql-hpcvp-install.log 2>&1 \
            || die "mariadb-install-db failed (see /var/log/mysql-hpcvp-install.log)"
    fi
    if ! mariadb-admin --protocol=socket ping >/dev/null 2>&1; then
        local server
        server="$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)"
        setsid "$server" --user=mysql --datadir="$datadir" --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
            >>/var/log/mysql-hpcvp.log 2>&1 </dev/null &
        wait_for 60 MariaDB mariadb-admin --protocol=socket ping
        say "MariaDB running"
    fi
    # OS root reaches MariaDB root through the unix socket (Debian default auth).
    mariadb --protocol=socket -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASSWORD}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASSWORD}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# slurm_conf_text KEY=VALUE...: the slurm.conf of either cluster. The settings both share are written
# here; the caller names what differs: header (comment lines), name, controller (host(address)),
# state_dir, spool_dir, ctld_pid, slurmd_pid, ctld_log, slurmd_log, ctld_port, dbd_host, node_lines
# (NodeName lines, each ending in a newline), partition_nodes; optional: auth_note (a comment above
# AuthInfo), prolog (lines after SlurmdPort), slurmd_timeout (a line after MinJobAge).
slurm_conf_text() {
    local header name controller state_dir spool_dir ctld_pid slurmd_pid ctld_log slurmd_log ctld_port
    local dbd_host node_lines partition_nodes auth_note="" prolog="" slurmd_timeout=""
    local "$@"
    # An optional part stands on lines of its own, or on none.
    [ -z "$auth_note" ] || auth_note+=$'\n'
    [ -z "$prolog" ] || prolog+=$'\n'
    [ -z "$slurmd_timeout" ] || slurmd_timeout+=$'\n'
    cat <<CONF
${header}
ClusterName=${name}
SlurmctldHost=${controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
${auth_note}AuthInfo=cred_expire=10
StateSaveLocation=${state_dir}/slurmctld
SlurmdSpoolDir=${spool_dir}
SlurmctldPidFile=${ctld_pid}
SlurmdPidFile=${slurmd_pid}
SlurmctldLogFile=${ctld_log}
SlurmdLogFile=${slurmd_log}
SlurmctldPort=${ctld_port}
SlurmdPort=6818
${prolog}MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
${slurmd_timeout}SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=${dbd_host}
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
${node_lines}PartitionName=cpu Nodes=${partition_nodes} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${partition_nodes} Default=NO MaxTime=01:00:00 State=UP
CONF
}

write_configs() {  # sets CONFIG_CHANGED=1 when slurm.conf/cgroup.conf changed, DBD_CHANGED=1 for slurmdbd.conf
    local host cpus mem_kb real_mem
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    real_mem=$((mem_kb / 1024 * 90 / 100))  # leave headroom: slurmd drains a node reporting less than this
    mkdir -p "$ETC" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"

    local slurm_conf
    slurm_conf="$(slurm_conf_text \
        header="# Written by hpcvp tools/slurm_local_cluster.sh: a single-node cluster for tests and workstations." \
        name="$CLUSTER_NAME" controller="${host}(127.0.0.1)" \
        auth_note="# A requeued job may start again once its credential expired: 10 s instead of the default 120 s." \
        state_dir="$STATE_DIR" spool_dir="$STATE_DIR/slurmd" \
        ctld_pid=/run/slurmctld.pid slurmd_pid=/run/slurmd.pid \
        ctld_log="$LOG_DIR/slurmctld.log" slurmd_log="$LOG_DIR/slurmd.log" ctld_port=6817 \
        dbd_host=localhost \
        node_lines="NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} Feature=cpu State=UNKNOWN"$'\n' \
        partition_nodes="$host")"
    local cgroup_conf="# Written by hpcvp tools/slurm_local_cluster.sh: no cgroup plugins are used (proctrack/linuxproc).
CgroupAutomount=no"
    CONFIG_CHANGED=0
    if write_if_changed "$ETC/slurm.conf" 0644 "$slurm_conf"; then CONFIG_CHANGED=1; fi
    if write_if_changed "$ETC/cgroup.conf" 0644 "$cgroup_conf"; then CONFIG_CHANGED=1; fi
    write_dbd_config
}

write_dbd_config() {  # sets DBD_CHANGED=1 when slurmdbd.conf changed (shared by both clusters)
    mkdir -p "$ETC" "$LOG_DIR"
    local dbd_conf
    dbd_conf="$(cat <<CONF
# Written by hpcvp tools/slurm_local_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASSWORD}
StorageLoc=slurm_acct_db
CONF
)"
    DBD_CHANGED=0
    # slurmdbd insists that its config (with the DB password) is private to SlurmUser.
    if write_if_changed "$ETC/slurmdbd.conf" 0600 "$dbd_conf"; then DBD_CHANGED=1; fi
    chown root:root "$ETC/slurmdbd.conf"
}

start_slurmdbd() {
    if [ "$DBD_CHANGED" -eq 1 ] || ! pid_alive /run/slurmdbd.pid; then
        stop_daemon slurmdbd /run/slurmdbd.pid
        /usr/sbin/slurmdbd
        # sacctmgr answers once slurmdbd has connected to MariaDB and created its tables.
        wait_for 60 slurmdbd sacctmgr -n list cluster
        say "slurmdbd running"
    fi
}

ensure_accounts() {
    local users=(root) user
    if [ -n "${SUDO_USER:-}" ] && [ "${SUDO_USER}" != root ]; then users+=("$SUDO_USER"); fi
    for user in ${HPCVP_SLURM_EXTRA_USERS:-}; do users+=("$user"); done
    if [ -z "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=cluster)" ]; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
        say "added cluster $CLUSTER_NAME to accounting"
    fi
    for account in "${ACCOUNTS[@]}"; do
        # Per cluster: the two-node cluster adds the same accounts to its own ClusterName.
        if [ -z "$(sacctmgr -n -P list assoc account="$account" cluster="$CLUSTER_NAME" format=account)" ]; then
            sacctmgr -i add account "$account" cluster="$CLUSTER_NAME" \
                description="hpcvp local test account" organization=hpcvp >/dev/null
            say "added account $account"
        fi
    done
    for user in "${users[@]}"; do
        id "$user" >/dev/null 2>&1 || { say "skipping unknown user $user"; continue; }
        for account in "${ACCOUNTS[@]}"; do
            if [ -z "$(sacctmgr -n -P list assoc user="$user" account="$account" cluster="$CLUSTER_NAME" format=user)" ]; then
                sacctmgr -i add user "$user" account="$account" cluster="$CLUSTER_NAME" >/dev/null
                say "added user $user to account $account"
            fi
        done
        sacctmgr -i modify user "$user" set defaultaccount="${ACCOUNTS[0]}" >/dev/null 2>&1 || true
    done
}

ensure_qos() {
    # A QoS besides "normal", allowed on every account, for the launcher's --qos tests (sacctmgr
    # only; nothing to restart). Idempotent.
    local user account
    if [ -z "$(sacctmgr -n -P list qos "$TEST_QOS" format=name)" ]; then
        sacctmgr -i add qos "$TEST_QOS" >/dev/null
        say "added qos $TEST_QOS"
    fi
    while IFS='|' read -r account user; do
        [ -n "$account" ] || continue
        if ! sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" account="$account" user="$user" format=qos \
            | tr ',' '\n' | grep -qx "$TEST_QOS"; then
            if [ -n "$user" ]; then
                sacctmgr -i modify user where name="$user" account="$account" cluster="$CLUSTER_NAME" set qos+="$TEST_QOS" >/dev/null
            else
                sacctmgr -i modify account where name="$account" cluster="$CLUSTER_NAME" set qos+="$TEST_QOS" >/dev/null
            fi
            say "allowed qos $TEST_QOS for account $account${user:+ user $user}"
        fi
    done < <(sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" format=account,user)
}

start_slurm_daemons() {
    local restart=0
    if [ "$CONFIG_CHANGED" -eq 1 ]; then restart=1; fi
    # AuthInfo and node definitions are read at start only: restart (not reconfigure) on change.
    if [ "$restart" -eq 1 ] || ! pid_alive /run/slurmctld.pid; then
        stop_daemon slurmd /run/slurmd.pid
        stop_daemon slurmctld /run/slurmctld.pid
        /usr/sbin/slurmctld
        wait_for 30 slurmctld scontrol ping
        say "slurmctld running"
    fi
    if [ "$restart" -eq 1 ] || ! pid_alive /run/slurmd.pid; then
        stop_daemon slurmd /run/slurmd.pid
        /usr/sbin/slurmd
        say "slurmd started"
    fi
    wait_node_in_service "$(hostname -s)" "$LOG_DIR/slurmd.log"
}

wait_node_in_service() {  # wait_node_in_service NODE LOG: until sinfo (of $SLURM_CONF's cluster) shows NODE usable
    local node="$1" log="$2" state _
    # A node left DOWN/DRAIN by an earlier crash is put back in service.
    for _ in $(seq 1 120); do
        state="$(sinfo -h -n "$node" -o '%t' 2>/dev/null | head -n1)"
        case "$state" in
            idle*|mix*|alloc*|comp*) return 0 ;;
            down*|drain*|drng*|fail*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $node did not become idle (sinfo state: $(sinfo -h -n "$node" -o '%t %E' 2>/dev/null)); see $log"
}

show_status() {
    local rc=0
    for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
        if case "$daemon" in
            slurmctld|slurmd) pid_alive "/run/$daemon.pid" ;;
            mariadbd) running mariadbd || running mysqld ;;
            *) running "$daemon" ;;
        esac; then
            printf '  %-10s running\n' "$daemon"
        else
            printf '  %-10s stopped\n' "$daemon"; rc=1
        fi
    done
    if [ "$rc" -eq 0 ]; then
        sinfo -o '%P %a %l %D %t %N %c %m %f' || rc=1
        sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" format=account,user | sed 's/^/  assoc /' || rc=1
    fi
    return "$rc"
}

cmd_up() {
    install_packages
    ensure_hostname_resolves
    start_munge
    start_mariadb
    write_configs
    start_slurmdbd
    ensure_accounts
    ensure_qos
    start_slurm_daemons
    say "cluster '$CLUSTER_NAME' is up:"
    show_status
}

cmd_stop() {
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
    stop_daemon slurmdbd /run/slurmdbd.pid
    if command -v mariadb-admin >/dev/null && mariadb-admin --protocol=socket ping >/dev/null 2>&1; then
        mariadb-admin --protocol=socket -u root shutdown && say "stopped MariaDB"
    fi
    stop_daemon munged /run/munge/munged.pid
}

# ---------------------------------------------------------------------------------------------
# The two-node cluster (`--nodes 2`): a second cluster beside the first, sharing munged, MariaDB and
# slurmdbd. Its slurmctld runs here on its own port; each node is a slurmd in its own network and
# UTS namespace (so `hostname` is the node's name) on a veth link to a bridge that holds the
# controller's address. The namespaces have no default route: they reach each other and the
# controller on 10.213.0.0/24, nothing else.
TWO_NAME="${HPCVP_SLURM_2NODE_CLUSTER_NAME:-hpcvp2}"
TWO_ETC=/etc/slurm-2node
TWO_CONF="$TWO_ETC/slurm.conf"
TWO_STATE=/var/lib/slurm-2node
TWO_TMP=/var/tmp/hpcvp2           # node-local scratch: $TWO_TMP/<node>/<job id> is $SLURM_TMPDIR
TWO_CTLD_PORT=6827
TWO_CTLD_PID=/run/slurmctld-2node.pid
TWO_BRIDGE=hpcvp2br
TWO_HOST_ADDR=10.213.0.1         # the controller (and slurmdbd) as the nodes see it
TWO_NODES=(hpcvp2n1 hpcvp2n2)     # addresses 10.213.0.11, 10.213.0.12
TWO_HOSTS_MARK="# hpcvp 2-node cluster"

two_addr() { printf '10.213.0.%d' $((10 + $1)); }   # two_addr INDEX (1-based)
two_netns() { printf 'hpcvp2-%s' "$1"; }            # two_netns NODE
two_slurmd_pid() { printf '/run/slurmd-2node-%s.pid' "$1"; }

two_network_up() {
    if ! ip link show "$TWO_BRIDGE" >/dev/null 2>&1; then
        ip link add "$TWO_BRIDGE" type bridge
        say "created bridge $TWO_BRIDGE"
    fi
    ip -4 addr show dev "$TWO_BRIDGE" | grep -q "inet $TWO_HOST_ADDR/" || ip addr add "$TWO_HOST_ADDR/24" dev "$TWO_BRIDGE"
    ip link set "$TWO_BRIDGE" up
    local i=0 node ns veth addr
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        ns="$(two_netns "$node")"
        veth="hpcvp2v$i"
        addr="$(two_addr "$i")"
        [ -e "/run/netns/$ns" ] || { ip netns add "$ns"; say "created network namespace $ns"; }
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$veth" master "$TWO_BRIDGE" up
        ip -n "$ns" link set lo up  # gloo and srun bind on loopback too
        ip -n "$ns" -4 addr show dev eth0 | grep -q "inet $addr/" || ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    # Node names resolve everywhere (the namespaces share this /etc/hosts); the file is rewritten
    # in place, not replaced, because containers often bind-mount it.
    local kept wanted
    kept="$(grep -v "$TWO_HOSTS_MARK" /etc/hosts || true)"
    wanted="$kept"
    i=0
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        wanted+=$'\n'"$(two_addr "$i") $node $TWO_HOSTS_MARK"
    done
    # The reverse names of the same addresses in their IPv4-mapped IPv6 form: torch's TCPStore
    # listens on a dual-stack socket, sees its clients as ::ffff:10.213.0.x and asks for their names;
    # without these lines glibc falls through to DNS, which the namespaces cannot reach, and every
    # rank logs "[c10d] The hostname of the client socket cannot be retrieved. err=-3" (EAI_AGAIN).
    i=0
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        wanted+=$'\n'"::ffff:$(two_addr "$i") $node $TWO_HOSTS_MARK"
    done
    if [ "$(cat /etc/hosts)" != "$wanted" ]; then
        printf '%s\n' "$wanted" >/etc/hosts
        say "added ${TWO_NODES[*]} to /etc/hosts"
    fi
    for node in "${TWO_NODES[@]}"; do
        getent hosts "$node" >/dev/null || die "$node does not resolve after editing /etc/hosts"
    done
}

two_network_down() {
    local i=0 node ns
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        ns="$(two_netns "$node")"
        if ip link show "hpcvp2v$i" >/dev/null 2>&1; then ip link del "hpcvp2v$i"; fi
        if [ -e "/run/netns/$ns" ]; then ip netns del "$ns" && say "removed network namespace $ns"; fi
    done
    if ip link show "$TWO_BRIDGE" >/dev/null 2>&1; then ip link del "$TWO_BRIDGE" && say "removed bridge $TWO_BRIDGE"; fi
    if grep -q "$TWO_HOSTS_MARK" /etc/hosts; then
        local kept
        kept="$(grep -v "$TWO_HOSTS_MARK" /etc/hosts || true)"
        printf '%s\n' "$kept" >/etc/hosts
        say "removed ${TWO_NODES[*]} from /etc/hosts"
    fi
}

two_write_configs() {  # sets CONFIG_CHANGED=1 when the two-node cluster's files changed
    local i=0 node node_lines="" names
    names="$(IFS=,; echo "${TWO_NODES[*]}")"
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        # CPUs=2 per node on a 2-core machine: the nodes share the cores, Slurm does not know.
        node_lines+="NodeName=$node NodeHostname=$node NodeAddr=$(two_addr "$i") CPUs=2 RealMemory=8000 Feature=cpu State=UNKNOWN"$'\n'
    done
    mkdir -p "$TWO_ETC" "$LOG_DIR" "$TWO_STATE/slurmctld" "$TWO_TMP"
    local slurm_conf
    slurm_conf="$(slurm_conf_text \
        header="# Written by hpcvp tools/slurm_local_cluster.sh up --nodes 2: two slurmd nodes in network namespaces.
# Use it with SLURM_CONF=${TWO_CONF}." \
        name="$TWO_NAME" controller="$(hostname -s)(${TWO_HOST_ADDR})" \
        state_dir="$TWO_STATE" spool_dir="$TWO_STATE/slurmd-%n" \
        ctld_pid="$TWO_CTLD_PID" slurmd_pid=/run/slurmd-2node-%n.pid \
        ctld_log="$LOG_DIR/2node-slurmctld.log" slurmd_log="$LOG_DIR/2node-slurmd-%n.log" ctld_port="$TWO_CTLD_PORT" \
        prolog="# \$SLURM_TMPDIR: a directory of this node's own (${TWO_TMP}/<node>/<job id>), as site prologs make.
TaskProlog=${TWO_ETC}/task_prolog.sh" \
        slurmd_timeout="SlurmdTimeout=30" \
        dbd_host="$TWO_HOST_ADDR" node_lines="$node_lines" partition_nodes="$names")"
    local task_prolog
    task_prolog="$(cat <<'PROLOG'
#!/bin/sh
# Written by hpcvp tools/slurm_local_cluster.sh up --nodes 2: node-local scratch for each job.
dir="/var/tmp/hpcvp2/${SLURMD_NODENAME:-$(hostname -s)}/${SLURM_JOB_ID:-none}"
mkdir -p "$dir" && echo "export SLURM_TMPDIR=$dir"
PROLOG
)"
    CONFIG_CHANGED=0
    if write_if_changed "$TWO_CONF" 0644 "$slurm_conf"; then CONFIG_CHANGED=1; fi
    if write_if_changed "$TWO_ETC/cgroup.conf" 0644 "CgroupAutomount=no"; then CONFIG_CHANGED=1; fi
    write_if_changed "$TWO_ETC/task_prolog.sh" 0755 "$task_prolog" || true
}

two_start_daemons() {
    local restart="$CONFIG_CHANGED" node i=0
    if [ "$restart" -eq 1 ] || ! pid_alive "$TWO_CTLD_PID"; then
        for node in "${TWO_NODES[@]}"; do stop_daemon slurmd "$(two_slurmd_pid "$node")"; done
        stop_daemon slurmctld "$TWO_CTLD_PID"
        /usr/sbin/slurmctld -f "$TWO_CONF"
        wait_for 30 "slurmctld ($TWO_NAME)" env SLURM_CONF="$TWO_CONF" scontrol ping
        say "slurmctld ($TWO_NAME, port $TWO_CTLD_PORT) running"
    fi
    for node in "${TWO_NODES[@]}"; do
        i=$((i + 1))
        if [ "$restart" -eq 1 ] || ! pid_alive "$(two_slurmd_pid "$node")"; then
            stop_daemon slurmd "$(two_slurmd_pid "$node")"
            mkdir -p "$TWO_STATE/slurmd-$node"
            # New UTS namespace inside the node's network namespace: the daemon and its jobs see
            # `hostname` = the node name (slurmd finds its NodeName through it). nsenter, not
            # `ip netns exec`: that remounts /sys, and slurmd wants the cgroup mount under it.
            nsenter --net="/run/netns/$(two_netns "$node")" -- unshare --uts -- \
                sh -c "hostname '$node' && exec /usr/sbin/slurmd -f '$TWO_CONF'"
            wait_for 15 "slurmd on $node" pid_alive "$(two_slurmd_pid "$node")"
            say "slurmd $node ($(two_addr "$i")) started"
        fi
    done
    for node in "${TWO_NODES[@]}"; do
        SLURM_CONF="$TWO_CONF" wait_node_in_service "$node" "$LOG_DIR/2node-slurmd-$node.log"
    done
}

two_status() {
    local rc=0 node
    for daemon in munged slurmdbd; do
        if running "$daemon"; then printf '  %-18s running\n' "$daemon"; else printf '  %-18s stopped\n' "$daemon"; rc=1; fi
    done
    if pid_alive "$TWO_CTLD_PID"; then printf '  %-18s running\n' "slurmctld ($TWO_NAME)"
    else printf '  %-18s stopped\n' "slurmctld ($TWO_NAME)"; rc=1; fi
    for node in "${TWO_NODES[@]}"; do
        if pid_alive "$(two_slurmd_pid "$node")"; then printf '  %-18s running (netns %s)\n' "slurmd $node" "$(two_netns "$node")"
        else printf '  %-18s stopped\n' "slurmd $node"; rc=1; fi
    done
    if [ "$rc" -eq 0 ]; then
        SLURM_CONF="$TWO_CONF" sinfo -o '%P %a %l %D %t %N %c %m %f' || rc=1
        sacctmgr -n -P list assoc cluster="$TWO_NAME" format=account,user | sed 's/^/  assoc /' || rc=1
        printf '  use it with: export SLURM_CONF=%s\n' "$TWO_CONF"
    fi
    return "$rc"
}

two_stop() {
    local node
    for node in "${TWO_NODES[@]}"; do stop_daemon slurmd "$(two_slurmd_pid "$node")"; done
    stop_daemon slurmctld "$TWO_CTLD_PID"
}

cmd_up_two() {
    install_packages
    command -v ip >/dev/null && command -v unshare >/dev/null || die "needs ip (iproute2) and unshare (util-linux)"
    start_munge
    start_mariadb
    write_dbd_config
    start_slurmdbd
    two_network_up
    two_write_configs
    CLUSTER_NAME="$TWO_NAME" ensure_accounts
    two_start_daemons
    say "cluster '$TWO_NAME' is up (SLURM_CONF=$TWO_CONF):"
    two_status
}

cmd_down_two() {  # stop the two-node cluster's daemons and remove its network and scratch
    two_stop
    two_network_down
    rm -rf "$TWO_TMP"
}

# ---------------------------------------------------------------------------------------------
COMMAND=up
NODES=1
while [ "$#" -gt 0 ]; do
    case "$1" in
        --nodes) NODES="${2:-}"; shift 2 || die "--nodes needs a value" ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        -h|--help|help) COMMAND=help; shift ;;
        -*) die "unknown option '$1'" ;;
        *) COMMAND="$1"; shift ;;
    esac
done
case "$NODES" in
    1|2) ;;
    *) die "--nodes $NODES: 1 (the default cluster) or 2 (the two-node cluster)" ;;
esac

if [ "$NODES" -eq 2 ]; then
    case "$COMMAND" in
        up|start) cmd_up_two ;;
        stop) two_stop ;;
        down) cmd_down_two ;;
        restart) two_stop; cmd_up_two ;;
        status) two_status ;;
        help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' ;;
        *) die "unknown subcommand '$COMMAND' (use: up | stop | down | restart | status)" ;;
    esac
    exit 0
fi

case "$COMMAND" in
    up|start) cmd_up ;;
    stop|down) cmd_stop ;;
    restart) cmd_stop; cmd_up ;;
    status) show_status ;;
    qos) ensure_qos ;;
    help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown subcommand '$COMMAND' (use: up | stop | down | restart | status | qos)" ;;
esac
