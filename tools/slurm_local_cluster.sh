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
    local name="$1" pidfile="${2:-}" pid
    if [ -n "$pidfile" ] && pid_alive "$pidfile"; then
        pid="$(cat "$pidfile")"
    else
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

write_configs() {  # sets CONFIG_CHANGED=1 when slurm.conf/cgroup.conf changed, DBD_CHANGED=1 for slurmdbd.conf
    local host cpus mem_kb real_mem
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    real_mem=$((mem_kb / 1024 * 90 / 100))  # leave headroom: slurmd drains a node reporting less than this
    mkdir -p "$ETC" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"

    local slurm_conf
    slurm_conf="$(cat <<CONF
# Written by hpcvp tools/slurm_local_cluster.sh: a single-node cluster for tests and workstations.
ClusterName=${CLUSTER_NAME}
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its credential expired: 10 s instead of the default 120 s.
AuthInfo=cred_expire=10
StateSaveLocation=${STATE_DIR}/slurmctld
SlurmdSpoolDir=${STATE_DIR}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
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
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} Feature=cpu State=UNKNOWN
PartitionName=cpu Nodes=${host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${host} Default=NO MaxTime=01:00:00 State=UP
CONF
)"
    local cgroup_conf="# Written by hpcvp tools/slurm_local_cluster.sh: no cgroup plugins are used (proctrack/linuxproc).
CgroupAutomount=no"
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
    CONFIG_CHANGED=0
    DBD_CHANGED=0
    if write_if_changed "$ETC/slurm.conf" 0644 "$slurm_conf"; then CONFIG_CHANGED=1; fi
    if write_if_changed "$ETC/cgroup.conf" 0644 "$cgroup_conf"; then CONFIG_CHANGED=1; fi
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
        if [ -z "$(sacctmgr -n -P list account "$account" format=account)" ]; then
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
    local host
    host="$(hostname -s)"
    # A node left DOWN/DRAIN by an earlier crash is put back in service.
    for _ in $(seq 1 120); do
        local state
        state="$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n1)"
        case "$state" in
            idle*|mix*|alloc*|comp*) return 0 ;;
            down*|drain*|drng*|fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $host did not become idle (sinfo state: $(sinfo -h -n "$host" -o '%t %E' 2>/dev/null)); see $LOG_DIR/slurmd.log"
}

show_status() {
    local rc=0
    for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
        if running "$daemon" || { [ "$daemon" = mariadbd ] && running mysqld; }; then
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

case "${1:-up}" in
    up|start) cmd_up ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_up ;;
    status) show_status ;;
    qos) ensure_qos ;;
    -h|--help|help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown subcommand '$1' (use: up | stop | restart | status | qos)" ;;
esac
