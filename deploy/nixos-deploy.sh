#!/usr/bin/env bash
# Deploys the flake in NIXOS_EC2_FLAKE_DIR to one NixOS host over SSH and switches the host to
# nixosConfigurations.<NIXOS_EC2_FLAKE_ATTR>. The NixosDeployment component runs it through
# @pulumi/command; every input arrives in the environment (see validate_inputs).
#
# Exactly two SSH connections per deploy:
#   1. a ControlMaster, opened by the wait-for-SSH loop, that carries one session: the flake and
#      deploy/remote-switch.sh as a tar stream, then the switch (a transient systemd unit on the
#      host, so a dropped connection cannot stop it half way); before it, when the host gets
#      secrets, a session that hands them over as a tar stream on its stdin; when the new system
#      cannot be switched to live and rebootPolicy allows it, a last session asks for the reboot;
#   2. a fresh connection that confirms the new system still lets the admin in (after the
#      reboot, that it booted the new system). Until it does, a timer on the host rolls back to
#      the generation recorded before the switch (after a reboot: reboots into it).
#
# Progress and errors go to stderr. The only stdout line is the final JSON result.
set -euo pipefail

case ${BASH_SOURCE[0]} in
*/*) readonly SCRIPT_DIR=${BASH_SOURCE[0]%/*} ;;
*) readonly SCRIPT_DIR=. ;;
esac
readonly DEFAULT_STATE_DIR=/var/lib/nixos-ec2
# Per-attempt cap while waiting for SSH (connection, key exchange and login together), so a
# dropped SYN or a server that stalls after its banner does not eat the whole deadline.
# Overridable only so that the integration tests need not wait 10 s for a stall.
readonly MAX_ATTEMPT_SECONDS=${NIXOS_EC2_SSH_ATTEMPT_SECONDS:-10}
readonly MAX_RETRY_DELAY_SECONDS=5
readonly PROGRESS_EVERY_SECONDS=10
# Beyond the host's own build and activation deadlines, what the copy-and-switch session may
# take: the host's lock wait (600 s), the upload and the rest. Overridable for the tests only.
readonly SESSION_SLACK_SECONDS=${NIXOS_EC2_SESSION_SLACK_SECONDS:-1200}
readonly KEEPALIVE_SECONDS=15
# The known_hosts entry names this alias, so one pinned line matches any address and port.
readonly HOST_KEY_ALIAS=nixos-ec2-target
# Exit statuses of deploy/remote-switch.sh (keep in sync with that file).
readonly REMOTE_BUILD_FAILED=20 REMOTE_ROLLED_BACK=21 REMOTE_ROLLBACK_FAILED=22
readonly REMOTE_BUSY=23 REMOTE_BAD_STATE=24 REMOTE_ALREADY_ROLLED_BACK=25 REMOTE_SUPERSEDED=26
readonly REMOTE_BUILD_TIMED_OUT=27 REMOTE_ACTIVATION_TIMED_OUT=28 REMOTE_REBOOT_REFUSED=29
readonly REMOTE_NOT_REBOOTED=32 REMOTE_SECRETS_MISSING=33 REMOTE_BAD_SECRETS=34
# Exit statuses of the bootstrap (remote_deploy_command), before remote-switch.sh runs.
readonly UPLOAD_NO_SPACE=30 UPLOAD_FAILED=31
readonly COMMAND_NOT_FOUND=127 SSH_FAILED=255
# Room the upload must leave free beyond its own size, in KiB.
readonly UPLOAD_HEADROOM_KIB=10240
# An upload this old is stale even if a process of its PID runs (a PID reused after a reboot):
# a deploy installs its upload within the host's lock wait (600 s) of receiving it.
readonly STALE_UPLOAD_MINUTES=120

WORK=""
SOCKET_DIR=""
MASTER_PID=""
WATCHDOG_PID=""
PRIVATE_KEY=""
# NIXOS_EC2_SECRETS, until write_secrets has written each secret to a 0600 file.
SECRETS=""
# The names of the host secrets this deploy sends, comma-separated, or "-" for none.
SECRET_NAMES="-"
SECRET_PROBLEMS=()
CONTROL_PATH=""
CONTROL_OPT=()
TARGET=""
WHERE=""
SSH_OPTS=()
# Where a rollback goes, for messages; names the number once the host reported it.
ROLLBACK_TARGET="the generation recorded before the switch"
PREVIOUS_GENERATION="<N>"
# This deploy's log on the host, once remote-switch.sh has made it (it prints "log=PATH").
HOST_LOG=""
# The host's boot ID before the reboot, when the switch prepared one (it prints "reboot=ID").
BOOT_BEFORE=""

log() {
    printf 'nixos-deploy: %s\n' "$*" >&2
}

# fail WHAT [NEXT...]: say what failed (and on which host, when known) and what to do next.
fail() {
    local what=$1 next
    shift
    printf 'nixos-deploy: error: %s\n' "$what" >&2
    for next in "$@"; do
        printf 'nixos-deploy:   next: %s\n' "$next" >&2
    done
    exit 1
}

# wait_for COMMAND...: runs COMMAND as a job and waits for it. Bash runs a trap only between
# foreground commands, but interrupts `wait` at once: so INT/TERM/HUP clean up without delay.
wait_for() {
    "$@" &
    wait "$!"
}

# progress_due REPORTS LAST CHANGED: whether a waiting loop should say something now. What it
# says reaches the stack's state, so the gap between reports doubles after every 5 of them, and a
# changed error is said at once only for the first 5: a two-hour wait prints about 35 lines.
progress_due() {
    local reports=$1 last=$2 changed=$3 gap
    gap=$((PROGRESS_EVERY_SECONDS << (reports / 5 < 8 ? reports / 5 : 8)))
    if [[ $changed == true ]] && ((reports < 5)); then
        return 0
    fi
    ((SECONDS - last >= gap))
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

validate_inputs() {
    local errors=()
    HOST=${NIXOS_EC2_HOST:-}
    PORT=${NIXOS_EC2_PORT:-22}
    REMOTE_USER=${NIXOS_EC2_USER:-root}
    HOST_PUBLIC_KEY=${NIXOS_EC2_HOST_PUBLIC_KEY:-}
    FLAKE_DIR=${NIXOS_EC2_FLAKE_DIR:-}
    FLAKE_ATTR=${NIXOS_EC2_FLAKE_ATTR:-}
    # No defaults here: the NixosDeployment component always passes these, from the config keys
    # declared (with their defaults) in lib/config.ts.
    CONNECT_TIMEOUT=${NIXOS_EC2_CONNECT_TIMEOUT_SECONDS:-}
    BUILD_TIMEOUT=${NIXOS_EC2_BUILD_TIMEOUT_SECONDS:-}
    ACTIVATION_TIMEOUT=${NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS:-}
    ROLLBACK_TIMEOUT=${NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS:-}
    ALLOW_FAILED_UNITS=${NIXOS_EC2_ALLOW_FAILED_UNITS:-}
    REBOOT_POLICY=${NIXOS_EC2_REBOOT_POLICY:-}

    # A leading "-" would turn the address into an ssh option.
    if [[ ! $HOST =~ ^[A-Za-z0-9_.:%][A-Za-z0-9_.:%-]*$ ]]; then
        errors+=("NIXOS_EC2_HOST must be a host name or IP address (got '${HOST}')")
    fi
    if ! is_uint "$SESSION_SLACK_SECONDS"; then
        errors+=("NIXOS_EC2_SESSION_SLACK_SECONDS must be a whole number of seconds (got '${SESSION_SLACK_SECONDS}')")
    fi
    if ! is_uint "$MAX_ATTEMPT_SECONDS" || ((10#$MAX_ATTEMPT_SECONDS < 1)); then
        errors+=("NIXOS_EC2_SSH_ATTEMPT_SECONDS must be a whole number of seconds >= 1 (got '${MAX_ATTEMPT_SECONDS}')")
    fi
    if ! is_uint "$PORT" || ((10#$PORT < 1 || 10#$PORT > 65535)); then
        errors+=("NIXOS_EC2_PORT must be a TCP port 1-65535 (got '${PORT}')")
    fi
    if [[ ! $REMOTE_USER =~ ^[a-z_][a-z0-9_-]*$ ]]; then
        errors+=("NIXOS_EC2_USER must be a user name like 'root' (got '${REMOTE_USER}')")
    fi
    if [[ $PRIVATE_KEY != *"-----BEGIN "*"PRIVATE KEY-----"* ]]; then
        errors+=("NIXOS_EC2_SSH_PRIVATE_KEY must hold an OpenSSH private key (it is empty or not a key; its value is not shown)")
    fi
    check_secrets
    if ((${#SECRET_PROBLEMS[@]} > 0)); then
        errors+=("${SECRET_PROBLEMS[@]}")
    fi
    # An ED25519 public key blob is always 51 bytes: this exact shape, nothing else.
    if [[ ! $HOST_PUBLIC_KEY =~ ^ssh-ed25519\ AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/]{43}(\ .*)?$ ]]; then
        errors+=("NIXOS_EC2_HOST_PUBLIC_KEY must be the host's 'ssh-ed25519 AAAA...' public key (got '${HOST_PUBLIC_KEY:0:40}')")
    fi
    if [[ -z $FLAKE_DIR || ! -f $FLAKE_DIR/flake.nix ]]; then
        errors+=("NIXOS_EC2_FLAKE_DIR must be a directory with a flake.nix (got '${FLAKE_DIR}')")
    fi
    # The same pattern as FLAKE_ATTR_PATTERN in lib/config.ts (a test keeps them equal): a Nix
    # identifier without "'", so that "nixosConfigurations.<attr>" needs no quoting.
    local flake_attr_pattern='^[A-Za-z_][A-Za-z0-9_-]{0,62}$'
    if [[ ! $FLAKE_ATTR =~ $flake_attr_pattern ]]; then
        errors+=("NIXOS_EC2_FLAKE_ATTR (flakeAttr) must name a nixosConfigurations entry: 1-63 letters, digits, '_' and '-', not starting with a digit or '-' (got '${FLAKE_ATTR:0:80}')")
    fi
    if ! is_uint "$CONNECT_TIMEOUT" || ((10#$CONNECT_TIMEOUT < 1)); then
        errors+=("NIXOS_EC2_CONNECT_TIMEOUT_SECONDS (deployConnectTimeoutSeconds) must be a whole number of seconds >= 1 (got '${CONNECT_TIMEOUT}')")
    fi
    if ! is_uint "$BUILD_TIMEOUT" || ((10#$BUILD_TIMEOUT < 1)); then
        errors+=("NIXOS_EC2_BUILD_TIMEOUT_SECONDS (buildTimeoutSeconds) must be a whole number of seconds >= 1 (got '${BUILD_TIMEOUT}')")
    fi
    if ! is_uint "$ACTIVATION_TIMEOUT" || ((10#$ACTIVATION_TIMEOUT < 1)); then
        errors+=("NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS (activationTimeoutSeconds) must be a whole number of seconds >= 1 (got '${ACTIVATION_TIMEOUT}')")
    fi
    if ! is_uint "$ROLLBACK_TIMEOUT" || ((10#$ROLLBACK_TIMEOUT < 1)); then
        errors+=("NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS (rollbackTimeoutSeconds) must be a whole number of seconds >= 1 (got '${ROLLBACK_TIMEOUT}')")
    fi
    if [[ $ALLOW_FAILED_UNITS != true && $ALLOW_FAILED_UNITS != false ]]; then
        errors+=("NIXOS_EC2_ALLOW_FAILED_UNITS (allowFailedUnits) must be 'true' or 'false' (got '${ALLOW_FAILED_UNITS}')")
    fi
    case $REBOOT_POLICY in
    never | when-required | always) ;;
    *) errors+=("NIXOS_EC2_REBOOT_POLICY (rebootPolicy) must be 'never', 'when-required' or 'always' (got '${REBOOT_POLICY:0:40}')") ;;
    esac
    if ((${#errors[@]} > 0)); then
        printf 'nixos-deploy: error: invalid deploy input:\n' >&2
        printf 'nixos-deploy:   - %s\n' "${errors[@]}" >&2
        printf 'nixos-deploy:   next: fix the NixosDeployment arguments (or these variables) and run again\n' >&2
        exit 2
    fi
    PORT=$((10#$PORT))
    CONNECT_TIMEOUT=$((10#$CONNECT_TIMEOUT))
    BUILD_TIMEOUT=$((10#$BUILD_TIMEOUT))
    ACTIVATION_TIMEOUT=$((10#$ACTIVATION_TIMEOUT))
    ROLLBACK_TIMEOUT=$((10#$ROLLBACK_TIMEOUT))
    TARGET="$REMOTE_USER@$HOST"
    WHERE="$HOST port $PORT"
    # Unique per deploy; names the host-side units and log. $RANDOM keeps this free of subprocesses.
    printf -v DEPLOY_ID '%04x%04x%04x' "$RANDOM" "$RANDOM" "$RANDOM"
}

# Closing the master first ends any session still running over it (a switch carries on on the
# host); then the background jobs end and their files can go.
cleanup() {
    if [[ -n $CONTROL_PATH && -S $CONTROL_PATH ]]; then
        ssh "${CONTROL_OPT[@]}" -O exit "$TARGET" >/dev/null 2>&1 || true
    fi
    if [[ -n $MASTER_PID ]]; then
        kill "$MASTER_PID" 2>/dev/null || true
    fi
    if [[ -n $WATCHDOG_PID ]]; then
        kill "$WATCHDOG_PID" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    if [[ -n $WORK ]]; then
        rm -rf "$WORK"
    fi
    if [[ -n $SOCKET_DIR ]]; then
        rm -rf "$SOCKET_DIR"
    fi
}

# A path as an ssh option value: ssh splits values at blanks unless quoted, takes backslashes
# as escapes, and expands % tokens in IdentityFile, UserKnownHostsFile and ControlPath
# (ssh_config(5) TOKENS). So any TMPDIR works.
ssh_path() {
    local p=${1//\\/\\\\}
    p=${p//\"/\\\"}
    p=${p//%/%%}
    printf '"%s"' "$p"
}

# A UNIX socket path is at most 104 bytes on macOS (108 on Linux), and the master first binds
# the path plus a 17-character suffix: a longer TMPDIR gets a short directory for the socket.
readonly MAX_SOCKET_PATH=80

make_workdir() {
    umask 077
    local base=${TMPDIR:-/tmp} LC_ALL=C
    # ssh expands ${VAR} in these option values (ssh_config(5), ENVIRONMENT VARIABLES) and has
    # no escape for it: such a TMPDIR is not used.
    # shellcheck disable=SC2016 # the two characters, not an expansion
    if [[ $base == *'${'* ]]; then
        log "TMPDIR ($base) holds '\${', which ssh would expand in file paths; using /tmp instead"
        base=/tmp
    fi
    WORK=$(mktemp -d "$base/nixos-deploy.XXXXXX")
    CONTROL_PATH=$WORK/cm
    # ${#...} counts bytes under LC_ALL=C, as the socket limit does.
    if ((${#CONTROL_PATH} > MAX_SOCKET_PATH)); then
        SOCKET_DIR=$(mktemp -d /tmp/nxd.XXXXXX)
        CONTROL_PATH=$SOCKET_DIR/cm
    fi
    CONTROL_OPT=(-o "ControlPath=$(ssh_path "$CONTROL_PATH")")
}

# The key and the secrets move from the environment into unexported variables before any child
# process starts, so none inherits them.
take_private_key() {
    PRIVATE_KEY=${NIXOS_EC2_SSH_PRIVATE_KEY:-}
    unset NIXOS_EC2_SSH_PRIVATE_KEY
    SECRETS=${NIXOS_EC2_SECRETS:-}
    unset NIXOS_EC2_SECRETS
}

# The same pattern as SECRET_NAME_PATTERN in lib/hostSecrets.ts (a test keeps them equal).
readonly SECRET_NAME_PATTERN='^[A-Za-z][A-Za-z0-9_-]{0,62}$'

# NIXOS_EC2_SECRETS is a line "<name> <value in base64>" per secret, each name once (the
# HostSecrets component makes it). Sets SECRET_NAMES, and SECRET_PROBLEMS, which name a line but
# never quote its value.
check_secrets() {
    local rest=$SECRETS line name value n=0 names=()
    while [[ -n $rest ]]; do
        line=${rest%%$'\n'*}
        if [[ $line == "$rest" ]]; then rest=""; else rest=${rest#*$'\n'}; fi
        n=$((n + 1))
        name=${line%% *}
        value=${line#* }
        if [[ $line != *" "* || ! $name =~ $SECRET_NAME_PATTERN || ! $value =~ ^[A-Za-z0-9+/]*={0,2}$ ]]; then
            SECRET_PROBLEMS+=("NIXOS_EC2_SECRETS line $n must be '<name> <value in base64>', the name matching $SECRET_NAME_PATTERN (the value is not shown)")
        elif [[ " ${names[*]-} " == *" $name "* ]]; then
            SECRET_PROBLEMS+=("NIXOS_EC2_SECRETS names the secret $name twice")
        else
            names+=("$name")
        fi
    done
    line="" value=""
    if ((${#names[@]} > 0)); then
        SECRET_NAMES=$(IFS=,; printf '%s' "${names[*]}")
    fi
}

# Into a 0600 file (umask 077) without passing through argv: printf is a builtin.
write_credentials() {
    local key=$PRIVATE_KEY
    PRIVATE_KEY=""
    while [[ $key == *$'\n' ]]; do
        key=${key%$'\n'}
    done
    printf '%s\n' "$key" >"$WORK/id"
    key=""
    write_secrets
    local key_type key_blob
    read -r key_type key_blob _ <<<"$HOST_PUBLIC_KEY"
    printf '%s %s %s\n' "$HOST_KEY_ALIAS" "$key_type" "$key_blob" >"$WORK/known_hosts"
}

# Each secret into its own 0600 file under the work directory (umask 077), decoded by base64 from
# a pipe that printf (a builtin) feeds: no value on a command line, and none in a here-document,
# which bash may put in a temporary file outside the work directory.
write_secrets() {
    local rest=$SECRETS line
    SECRETS=""
    [[ $SECRET_NAMES != - ]] || return 0
    mkdir "$WORK/secrets"
    while [[ -n $rest ]]; do
        line=${rest%%$'\n'*}
        if [[ $line == "$rest" ]]; then rest=""; else rest=${rest#*$'\n'}; fi
        printf '%s' "${line#* }" | base64 -d >"$WORK/secrets/${line%% *}" ||
            fail "decoding the secret ${line%% *} of NIXOS_EC2_SECRETS failed (its value is not shown)" "check what the HostSecrets component hands the deploy"
    done
    line=""
}

set_ssh_options() {
    # -F /dev/null: the user's ssh config must not change what gets trusted or which key is used.
    SSH_OPTS=(
        -F /dev/null
        -p "$PORT"
        -o BatchMode=yes
        -o IdentitiesOnly=yes
        -o IdentityAgent=none
        -o "IdentityFile=$(ssh_path "$WORK/id")"
        -o PreferredAuthentications=publickey
        -o StrictHostKeyChecking=yes
        -o "UserKnownHostsFile=$(ssh_path "$WORK/known_hosts")"
        -o GlobalKnownHostsFile=/dev/null
        -o HostKeyAlias="$HOST_KEY_ALIAS"
        -o HostKeyAlgorithms=ssh-ed25519
        -o CheckHostIP=no
        -o UpdateHostKeys=no
        -o ForwardAgent=no
        -o ClearAllForwardings=yes
        -o RequestTTY=no
        -o ServerAliveInterval="$KEEPALIVE_SECONDS"
        -o ServerAliveCountMax=4
        -o LogLevel=ERROR
    )
}

# The flake's files, NUL-separated, relative to FLAKE_DIR. Left out, and nothing else: build
# links (result and result-* when they are symbolic links), editor droppings (*~, .#*, #*#, *.swp,
# *.swo, .DS_Store) and .git and .direnv. lib/flakeHash.ts leaves out the same for the trigger
# hash; an integration test compares the two on one tree.
flake_files() {
    cd "$FLAKE_DIR"
    find . \( -name .git -o -name .direnv -o -name '*~' -o -name '.#*' -o -name '#*#' \
        -o -name '*.swp' -o -name '*.swo' -o -name .DS_Store \) -prune \
        -o -type l \( -name result -o -name 'result-*' \) \
        -o -print0
}

copy_payload() {
    mkdir -p "$WORK/payload/new/bin" "$WORK/payload/new/flake"
    cp "$SCRIPT_DIR/remote-switch.sh" "$WORK/payload/new/bin/"
    # COPYFILE_DISABLE keeps macOS tar from adding ._* resource-fork files.
    (flake_files) | (cd "$FLAKE_DIR" && COPYFILE_DISABLE=1 tar --null --no-recursion -T - -cf -) |
        tar -C "$WORK/payload/new/flake" -xf -
}

last_line() {
    local line="" last=""
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        if [[ -n $line ]]; then
            last=$line
        fi
    done <"$1"
    printf '%s' "$last"
}

# Prints one of: host-key, auth, no-ed25519, retry, other.
classify_ssh_error() {
    local text
    text=$(<"$1")
    case $text in
    *"REMOTE HOST IDENTIFICATION HAS CHANGED"* | *"Host key verification failed"* | *"host key mismatch"*) echo host-key ;;
    *"no matching host key type"*) echo no-ed25519 ;;
    *"Permission denied"* | *"Too many authentication failures"* | *"Load key"*) echo auth ;;
    *"Connection refused"* | *"timed out"* | *"No route to host"* | *"Connection reset"* | \
        *"kex_exchange_identification"* | *"Connection closed"* | *"Network is unreachable"* | \
        *"banner exchange"* | *"Broken pipe"* | *"handshake did not finish"*) echo retry ;;
    # ssh gives up without a word when keepalives go unanswered mid-handshake: a stall, retried.
    "") echo retry ;;
    *) echo other ;;
    esac
}

pinned_fingerprint() {
    ssh-keygen -l -f "$WORK/known_hosts" 2>/dev/null | awk '{print $2}' || true
}

fail_host_key() {
    local presented
    presented=$(grep -o 'SHA256:[A-Za-z0-9+/=]*' "$1" | head -n 1 || true)
    fail "the SSH host key of $WHERE did not match the pinned key (NIXOS_EC2_HOST_PUBLIC_KEY, $(pinned_fingerprint)); it presented ${presented:-another key}. This is a possible interception (man-in-the-middle) or a host that is not the one Pulumi created. Not retrying." \
        "compare with the fingerprints in the instance's console output (between -----BEGIN SSH HOST KEY FINGERPRINTS----- and -----END SSH HOST KEY FINGERPRINTS-----)" \
        "if the instance was replaced or its host key changed outside Pulumi, run 'pulumi refresh' and check the address in NIXOS_EC2_HOST; never disable the check"
}

fail_auth() {
    fail "$WHERE refused the SSH key for user '$REMOTE_USER': $(last_line "$1")" \
        "check that NIXOS_EC2_SSH_PRIVATE_KEY belongs to the instance's key pair and that the NixOS configuration keeps the admin key in users.users.$REMOTE_USER.openssh.authorizedKeys"
}

# try_master SECONDS ERR: one attempt at connection 1. The master runs as a job of this script,
# not daemonized by `ssh -f`: it stays in the script's process group, so killing the deploy
# (Pulumi cancelled, say) ends the master too, and with it every descriptor a session handed it
# (mux clients pass their stdio to the master), such as the pipe Pulumi reads.
# Returns 0 once the master is up, 1 when ssh gave up (ERR says why), 2 when it did not finish
# connecting, exchanging keys and logging in within SECONDS (it is then killed).
try_master() {
    local seconds=$1 err=$2 until=$((SECONDS + $1))
    ssh "${SSH_OPTS[@]}" -o ConnectTimeout="$seconds" -o ControlMaster=yes "${CONTROL_OPT[@]}" -o ControlPersist=no \
        -N "$TARGET" </dev/null >/dev/null 2>"$err" &
    MASTER_PID=$!
    while :; do
        if ! kill -0 "$MASTER_PID" 2>/dev/null; then
            wait "$MASTER_PID" 2>/dev/null || true
            MASTER_PID=""
            return 1
        fi
        # ssh makes the socket once it is logged in; asking the master itself costs a process.
        if [[ -S $CONTROL_PATH ]] && ssh "${CONTROL_OPT[@]}" -O check "$TARGET" >/dev/null 2>&1; then
            return 0
        fi
        if ((SECONDS > until)); then
            kill "$MASTER_PID" 2>/dev/null || true
            wait "$MASTER_PID" 2>/dev/null || true
            MASTER_PID=""
            printf 'the SSH handshake did not finish within %ss (the server accepted the connection and then stalled)\n' "$seconds" >"$err"
            return 2
        fi
        wait_for sleep 0.05
    done
}

# Connection 1: retry until the deadline while the host is booting or the port is closed; a
# host key or authentication failure is final at once.
open_master() {
    local deadline=$((SECONDS + CONNECT_TIMEOUT)) attempt=0 remaining attempt_seconds outcome
    local delay=1 error_text="" last_error="" last_report=$((SECONDS - PROGRESS_EVERY_SECONDS)) reports=0
    local err=$WORK/connect.err
    log "connecting to $WHERE as $REMOTE_USER (waiting up to ${CONNECT_TIMEOUT}s for SSH)"
    while :; do
        attempt=$((attempt + 1))
        remaining=$((deadline - SECONDS))
        attempt_seconds=$((remaining < MAX_ATTEMPT_SECONDS ? remaining : MAX_ATTEMPT_SECONDS))
        attempt_seconds=$((attempt_seconds < 1 ? 1 : attempt_seconds))
        outcome=0
        try_master "$attempt_seconds" "$err" || outcome=$?
        if ((outcome == 0)); then
            log "connected to $WHERE after $attempt attempt(s)"
            return 0
        fi
        error_text=$(last_line "$err")
        case $(classify_ssh_error "$err") in
        host-key) fail_host_key "$err" ;;
        auth) fail_auth "$err" ;;
        no-ed25519)
            fail "$WHERE offers no ssh-ed25519 host key: $error_text" \
                "the host must use the ED25519 host key generated by the program (SSH_HOST_ED25519_KEY in the user data); check the instance's user data"
            ;;
        other)
            fail "SSH to $WHERE failed: ${error_text:-ssh exited without a message}" \
                "run the same ssh by hand to see the full error; check NIXOS_EC2_HOST and NIXOS_EC2_PORT"
            ;;
        esac
        if ((SECONDS >= deadline)); then
            fail "no SSH connection to $WHERE within ${CONNECT_TIMEOUT}s (deployConnectTimeoutSeconds), $attempt attempt(s); last SSH error: $error_text" \
                "check that the instance is running and booted (EC2 console output)" \
                "check that its security group allows TCP $PORT from this machine, and that the allowed CIDR contains this machine's current public IP" \
                "check that NIXOS_EC2_HOST ($HOST) is the instance's current public address"
        fi
        if progress_due "$reports" "$last_report" "$([[ $error_text != "$last_error" ]] && echo true || echo false)"; then
            log "waiting for SSH on $WHERE (attempt $attempt, $((deadline - SECONDS))s left): ${error_text:0:160}"
            last_report=$SECONDS
            last_error=$error_text
            reports=$((reports + 1))
        fi
        remaining=$((deadline - SECONDS))
        wait_for sleep $((delay < remaining ? delay : remaining))
        delay=$((delay >= MAX_RETRY_DELAY_SECONDS ? MAX_RETRY_DELAY_SECONDS : delay + 1))
    done
}

# In the background: the master's teardown overlaps the confirm connection, which must not
# ride on it anyway (ControlPath=none).
close_master() {
    ssh "${CONTROL_OPT[@]}" -O exit "$TARGET" >/dev/null 2>&1 &
}

# Expanded by the remote shell: only the bootstrap that unpacks remote-switch.sh is inline. It
# removes the uploads of earlier deploys that died (each is named after the PID of the shell that
# received it; any older than STALE_UPLOAD_MINUTES too), refuses at once when the upload cannot
# fit, and removes its own upload if the transfer fails or the connection drops.
remote_deploy_command() {
    local need_kib
    need_kib=$(($(du -sk "$WORK/payload" | awk '{print $1}') + UPLOAD_HEADROOM_KIB))
    # shellcheck disable=SC2016
    # The secrets this deploy handed over before (send_secrets) go too if the bootstrap fails.
    printf '%s' 'set -eu; umask 077; d="${NIXOS_EC2_STATE_DIR:-'"$DEFAULT_STATE_DIR"'}"; [ -d "$d" ] || mkdir -p "$d"; ' \
        'trap '"'"'rm -rf "$d/secrets.d/.incoming.'"$DEPLOY_ID"'"'"'"' EXIT; ' \
        'for o in "$d"/upload.*; do [ -e "$o" ] || continue; p=${o##*/upload.}; p=${p%%.*}; ' \
        'case $p in *[!0-9]* | "") rm -rf "$o" ;; *) kill -0 "$p" 2>/dev/null || rm -rf "$o" ;; esac; done; ' \
        'find "$d" -maxdepth 1 -name "upload.*" -mmin +'"$STALE_UPLOAD_MINUTES"' -exec rm -rf {} + 2>/dev/null || true; ' \
        'free=$(df -Pk "$d" 2>/dev/null | awk '"'"'NR == 2 { print $4 }'"'"') || true; need='"$need_kib"'; ' \
        'case $free in "" | *[!0-9]*) ;; *) if [ "$free" -lt "$need" ]; then echo "nixos-ec2: not enough disk space for the upload: $free KiB free in $d, it needs $need KiB" >&2; exit '"$UPLOAD_NO_SPACE"'; fi ;; esac; ' \
        'u=$(mktemp -d "$d/upload.$$.XXXXXX"); trap '"'"'rm -rf "$u"'"'"' HUP INT TERM PIPE; ' \
        'tar --no-same-owner -m -xf - -C "$u" || { s=$?; rm -rf "$u"; echo "nixos-ec2: receiving the upload into $u failed (tar exited $s); removed it" >&2; exit '"$UPLOAD_FAILED"'; }; ' \
        'trap - HUP INT TERM PIPE EXIT; ' \
        'exec bash "$u/new/bin/remote-switch.sh" deploy "$u" '"$DEPLOY_ID $FLAKE_ATTR $ROLLBACK_TIMEOUT $ALLOW_FAILED_UNITS $BUILD_TIMEOUT $ACTIVATION_TIMEOUT $REBOOT_POLICY $SECRET_NAMES"
}

# Expanded by the remote shell: unpacks the secrets from stdin into secrets.d/.incoming.<deploy id>
# (0700, root's), the only place they are written before remote-switch.sh installs them; a
# transfer that fails removes what arrived. Incoming sets older than STALE_UPLOAD_MINUTES belong
# to deploys that died, and go.
remote_secrets_command() {
    # shellcheck disable=SC2016
    printf '%s' 'set -eu; umask 077; s="${NIXOS_EC2_STATE_DIR:-'"$DEFAULT_STATE_DIR"'}/secrets.d"; [ -d "$s" ] || mkdir -p "$s"; chmod 700 "$s"; ' \
        'find "$s" -maxdepth 1 -name ".incoming.*" -mmin +'"$STALE_UPLOAD_MINUTES"' -exec rm -rf {} + 2>/dev/null || true; ' \
        'i="$s/.incoming.'"$DEPLOY_ID"'"; mkdir "$i"; trap '"'"'rm -rf "$i"'"'"' HUP INT TERM PIPE; ' \
        'tar --no-same-owner -m -xf - -C "$i" || { c=$?; rm -rf "$i"; echo "nixos-ec2: receiving the secrets into $i failed (tar exited $c); removed them" >&2; exit '"$UPLOAD_FAILED"'; }'
}

# Over connection 1, before the switch: the secrets as a tar stream on the session's stdin.
send_secrets() {
    [[ $SECRET_NAMES != - ]] || return 0
    local statuses=() status
    log "handing the secrets ${SECRET_NAMES//,/, } to $WHERE over the same connection"
    set +e
    tar -C "$WORK/secrets" -cf - . |
        ssh "${SSH_OPTS[@]}" -o ControlMaster=no "${CONTROL_OPT[@]}" "$TARGET" "$(remote_secrets_command)" >/dev/null 2>"$WORK/secrets.err"
    statuses=("${PIPESTATUS[@]}")
    set -e
    rm -rf "$WORK/secrets"
    bounded_log 1024 <"$WORK/secrets.err" >&2
    status=${statuses[1]}
    if ((statuses[0] != 0)); then
        fail "packing the secrets for $WHERE failed (tar exited ${statuses[0]}); nothing was sent or changed" "check that ${TMPDIR:-/tmp} has space, then deploy again"
    fi
    case $status in
    0) ;;
    "$UPLOAD_FAILED")
        fail "$WHERE could not store the secrets (see above); what arrived was removed and nothing was changed" \
            "check the free space and the health of the host's disk (df -h $DEFAULT_STATE_DIR), then deploy again"
        ;;
    *)
        fail "handing the secrets to $WHERE failed (remote exit status $status, see above); nothing was changed" \
            "check the connection to the host, then deploy again"
        ;;
    esac
}

# remote_command ARGS...: runs the installed remote-switch.sh with ARGS (words that need no quoting).
remote_command() {
    # shellcheck disable=SC2016
    printf 'exec bash "${NIXOS_EC2_STATE_DIR:-%s}/bin/remote-switch.sh" %s' "$DEFAULT_STATE_DIR" "$*"
}

host_log_hint() {
    if [[ -n $HOST_LOG ]]; then
        printf "ssh in and read %s (this deploy's log) and 'journalctl -u \"nixos-ec2-*-%s*\"'" "$HOST_LOG" "$DEPLOY_ID"
    else
        printf 'the host-side script (remote-switch.sh) never started, so this deploy wrote no log on the host: the messages above are all there is'
    fi
}

# Session on connection 1: the tar stream, then the switch, whose log streams to stderr.
# Runs as a job (see wait_for), so it leaves the statuses of tar and ssh in a file.
# Its stderr (the host's log, streamed) goes through tee and bounded_log, processes of this
# script's group: tee keeps a copy that says which phase a stuck session is in, and no process
# outside the group holds the pipe Pulumi reads (a mux client hands its stdio to the master).
send_and_switch() {
    set +e
    tar -C "$WORK/payload" -cf - new |
        ssh "${SSH_OPTS[@]}" -o ControlMaster=no "${CONTROL_OPT[@]}" \
            "$TARGET" "$(remote_deploy_command)" >"$WORK/switch.out" 2> >(tee -a "$WORK/switch.log" | bounded_log "$BUILD_OUTPUT_BYTES" >&2)
    printf '%s %s\n' "${PIPESTATUS[@]}" >"$WORK/switch.status"
    wait "$!" 2>/dev/null
}

# session_watchdog SECONDS: the host bounds its build and its activation itself; this bounds the
# whole session in case the host cannot (its processes frozen while the connection stays up).
# At the deadline it closes connection 1, which ends the session. A job of this script, with its
# own sleep, both ended when the session ends first.
session_watchdog() {
    local pause=""
    trap 'kill "$pause" 2>/dev/null; exit 0' TERM
    sleep "$1" &
    pause=$!
    wait "$pause" || exit 0
    : >"$WORK/session.timed-out"
    ssh "${CONTROL_OPT[@]}" -O exit "$TARGET"
}

# bounded_log BUILD_BYTES: passes the host's log from stdin to stdout, bounded, because
# @pulumi/command keeps a deploy's whole stdout and stderr in the stack's state, in every
# checkpoint. Progress lines (remote-switch.sh's "[HH:MM:SS] ..."), up to PROGRESS_BYTES, and the
# log tail a failure ends with, pass as they come, each cut to LINE_CHARS; other output (the
# build's) passes for its first BUILD_BYTES, then one line says what was left out. The host keeps
# the whole log. What one deploy prints stays under 16 KiB, whatever the build prints.
readonly LINE_CHARS=200 PROGRESS_BYTES=3072 TAIL_BYTES=8192 BUILD_OUTPUT_BYTES=2048
bounded_log() {
    # Bytes, not characters, in ${#line}.
    local LC_ALL=C
    local build_left=$1 progress_left=$PROGRESS_BYTES tail_left=$TAIL_BYTES in_tail=false line
    local dropped=0 dropped_progress=0
    while IFS= read -r line || [[ -n $line ]]; do
        ((${#line} > LINE_CHARS)) && line="${line:0:LINE_CHARS}..."
        if [[ $line == "---- last "*" lines of "* ]]; then
            in_tail=true
        fi
        if [[ $in_tail == true ]]; then
            if ((tail_left > 0)); then
                printf '%s\n' "$line"
                tail_left=$((tail_left - ${#line} - 1))
            fi
            [[ $line == "---- end of log ----" ]] && in_tail=false
        elif [[ $line =~ ^\[[0-9]{2}:[0-9]{2}:[0-9]{2}\]\  ]]; then
            if ((progress_left > 0)); then
                printf '%s\n' "$line"
                progress_left=$((progress_left - ${#line} - 1))
            else
                dropped_progress=$((dropped_progress + 1))
            fi
        elif ((build_left > 0)); then
            printf '%s\n' "$line"
            build_left=$((build_left - ${#line} - 1))
        else
            ((dropped == 0)) && printf 'nixos-deploy: (more build output is left out here to keep the stack'"'"'s state small; the host keeps the whole log)\n'
            dropped=$((dropped + 1))
        fi
    done
    if ((dropped > 0 || dropped_progress > 0)); then
        printf 'nixos-deploy: (%s lines of build output and %s progress lines were left out here)\n' "$dropped" "$dropped_progress"
    fi
}

# The phase the host's log last reached (remote-switch.sh says "building", then "activating").
session_phase() {
    local phase="uploading the flake" line
    while IFS= read -r line; do
        case $line in
        *"] building "*) phase="building the new system" ;;
        *"] activating "*) phase="activating the new system" ;;
        *"] rolling back"*) phase="rolling back" ;;
        esac
    done <"$WORK/switch.log"
    printf '%s' "$phase"
}

copy_and_switch() {
    local statuses=() status
    local limit=$((BUILD_TIMEOUT + ACTIVATION_TIMEOUT + SESSION_SLACK_SECONDS))
    log "copying $FLAKE_DIR to $HOST:$DEFAULT_STATE_DIR/flake and switching to #$FLAKE_ATTR (deploy $DEPLOY_ID)"
    : >"$WORK/switch.log"
    session_watchdog "$limit" </dev/null >/dev/null 2>&1 &
    WATCHDOG_PID=$!
    wait_for send_and_switch || true
    kill "$WATCHDOG_PID" 2>/dev/null || true
    wait "$WATCHDOG_PID" 2>/dev/null || true
    WATCHDOG_PID=""
    if [[ -f $WORK/session.timed-out ]]; then
        fail "the copy and switch on $WHERE did not end within ${limit}s (buildTimeoutSeconds + activationTimeoutSeconds + ${SESSION_SLACK_SECONDS}s), while $(session_phase); this deploy stopped waiting. The host ended neither step by its own deadlines, so its processes may be frozen: if it switched, it rolls itself back within ${ROLLBACK_TIMEOUT}s because this deploy cannot confirm it" \
            "check the host (EC2 console output; 'systemctl list-units \"nixos-ec2-*\"' once SSH works); $(host_log_hint)" \
            "then run the deploy again"
    fi
    if [[ -f $WORK/switch.status ]]; then
        read -r -a statuses <"$WORK/switch.status" || true
    fi
    status=${statuses[1]:-$SSH_FAILED}
    # remote-switch.sh prints its log's path first and, last, the generation it recorded (the
    # one a rollback returns to).
    local recorded line
    while IFS= read -r line; do
        [[ $line == log=/* ]] && HOST_LOG=${line#log=}
        [[ $line =~ ^reboot=([0-9a-f-]+)$ ]] && BOOT_BEFORE=${BASH_REMATCH[1]}
    done <"$WORK/switch.out"
    recorded=$(last_line "$WORK/switch.out")
    if is_uint "$recorded"; then
        PREVIOUS_GENERATION=$recorded
        ROLLBACK_TARGET="generation $recorded"
    fi
    case $status in
    0) return 0 ;;
    "$REMOTE_BUILD_TIMED_OUT")
        fail "building #$FLAKE_ATTR on $WHERE did not finish within ${BUILD_TIMEOUT}s (buildTimeoutSeconds) and was stopped; the host was not changed (log tail above)" \
            "see in the log what the build was waiting for (a hanging substituter or a slow download, say); $(host_log_hint)" \
            "raise buildTimeoutSeconds if this build is simply long (a first build on a small instance), then deploy again"
        ;;
    "$REMOTE_ACTIVATION_TIMED_OUT")
        fail "activating #$FLAKE_ATTR on $WHERE did not finish within ${ACTIVATION_TIMEOUT}s (activationTimeoutSeconds); it was stopped and the host rolled back to $ROLLBACK_TARGET (log tail above)" \
            "see in the log which unit activation was waiting for; $(host_log_hint)"
        ;;
    "$REMOTE_REBOOT_REFUSED")
        fail "#$FLAKE_ATTR cannot be switched to live on $WHERE and needs a reboot, which rebootPolicy=never forbids; the host was not changed and still runs $ROLLBACK_TARGET (log tail above)" \
            "set rebootPolicy to when-required for this host (nixos-ec2:rebootPolicy, or hosts.<name>.rebootPolicy) and run 'pulumi up' again: the deploy then boots the new system once and confirms it" \
            "or leave the change out of the flake until a reboot is acceptable"
        ;;
    "$REMOTE_BUILD_FAILED")
        fail "building #$FLAKE_ATTR on $WHERE failed; the host was not changed (log tail above)" \
            "fix the configuration in $FLAKE_DIR; $(host_log_hint)"
        ;;
    "$REMOTE_ROLLED_BACK")
        fail "switching $WHERE to #$FLAKE_ATTR failed and the host rolled back to $ROLLBACK_TARGET (log tail above)" \
            "read the activation errors above; $(host_log_hint)" \
            "units that failed to start make the deploy fail unless allowFailedUnits is true"
        ;;
    "$REMOTE_ROLLBACK_FAILED")
        fail "switching $WHERE to #$FLAKE_ATTR failed AND the rollback to $ROLLBACK_TARGET failed; the host may be half switched (log tail above)" \
            "$(host_log_hint)" \
            "roll back by hand: nix-env -p /nix/var/nix/profiles/system --switch-generation $PREVIOUS_GENERATION && /nix/var/nix/profiles/system/bin/switch-to-configuration switch"
        ;;
    "$REMOTE_BAD_STATE")
        fail "$WHERE is not in a state this deploy can work with (see the error above); nothing was switched" \
            "$(host_log_hint)"
        ;;
    "$REMOTE_SECRETS_MISSING")
        fail "#$FLAKE_ATTR uses host secrets that $WHERE does not get (named above); the host was not changed" \
            "name this host for each of them in nixos-ec2:hostSecrets and set the value with 'pulumi config set --secret nixos-ec2:secret.<name>', or drop it from the host's configuration (nixosEc2.secrets)"
        ;;
    "$REMOTE_BAD_SECRETS")
        fail "the secrets this deploy sent did not arrive whole on $WHERE (see above); the host was not changed" \
            "deploy again"
        ;;
    "$REMOTE_BUSY")
        fail "another deploy or rollback is running on $WHERE" \
            "wait for it to finish ('systemctl list-units \"nixos-ec2-*\"' on the host), then run again"
        ;;
    "$UPLOAD_NO_SPACE")
        fail "$WHERE has too little disk space for the upload (see the message above); nothing was copied or changed" \
            "free space on the host ('nix-collect-garbage -d' removes old generations) or grow its root volume (rootVolumeGiB), then deploy again"
        ;;
    "$UPLOAD_FAILED")
        fail "the upload to $WHERE failed while the host received it (see the message above); its partial copy was removed and nothing was changed" \
            "check the free space and the health of the host's disk (df -h $DEFAULT_STATE_DIR), then deploy again"
        ;;
    "$COMMAND_NOT_FOUND")
        fail "a command the deploy needs is missing on $WHERE (exit status 127, 'command not found': see the message above); nothing was switched" \
            "the host side needs bash, tar, df, mktemp, flock, systemd-run, nix-env and nixos-rebuild on the admin's PATH: is $HOST a NixOS host booted from the project's configuration?" \
            "$(host_log_hint)"
        ;;
    "$SSH_FAILED")
        if [[ -n $HOST_LOG ]]; then
            fail "the SSH connection to $WHERE failed during the switch (deploy $DEPLOY_ID); the switch continues on the host, and a switched host rolls itself back within ${ROLLBACK_TIMEOUT}s because this deploy cannot confirm it" \
                "$(host_log_hint)" \
                "then run the deploy again"
        fi
        fail "the SSH connection to $WHERE failed before the host-side script started (deploy $DEPLOY_ID); nothing was switched" \
            "check the connection to the host (the SSH error is above), then run the deploy again"
        ;;
    *)
        if ((${statuses[0]:-0} != 0)); then
            fail "packing $FLAKE_DIR for upload failed (tar exited ${statuses[0]})" "check that every file under $FLAKE_DIR is readable"
        fi
        fail "the copy or switch on $WHERE failed (remote exit status $status); see the messages above" \
            "$(host_log_hint)"
        ;;
    esac
}

# Over connection 1, after the switch prepared a boot of the new system: reboot the host. The
# session ends with the connection when the host goes down, so only a refusal counts.
request_reboot() {
    local status=0
    log "the new system needs a reboot; rebooting $WHERE into it (generation ${ROLLBACK_TARGET#generation } stays the boot default until it is confirmed)"
    wait_for ssh "${SSH_OPTS[@]}" -o ControlMaster=no "${CONTROL_OPT[@]}" "$TARGET" "$(remote_command reboot "$DEPLOY_ID")" \
        </dev/null >/dev/null 2>"$WORK/reboot.err" || status=$?
    bounded_log 1024 <"$WORK/reboot.err" >&2
    case $status in
    0) ;;
    "$SSH_FAILED")
        # The reboot cuts the session; a session that failed before the host said it reboots did not.
        if ! grep -qF "] deploy $DEPLOY_ID: rebooting into generation" "$WORK/reboot.err"; then
            fail "the request to reboot $WHERE did not reach the host (SSH failed: $(last_line "$WORK/reboot.err")); the host was not rebooted, and undoes the prepared boot within ${ROLLBACK_TIMEOUT}s: it keeps running $ROLLBACK_TARGET" \
                "check the connection to the host, then run the deploy again"
        fi
        ;;
    *)
        fail "$WHERE did not reboot (remote exit status $status, see above); the prepared boot was undone or is undone within ${ROLLBACK_TIMEOUT}s, and the host runs $ROLLBACK_TARGET" \
            "$(host_log_hint)"
        ;;
    esac
}

# Connection 2, always fresh: if the new system locked the admin out, this is where it shows.
# MODE is live (after a live switch) or boot (after the reboot: the wait for the host to come
# back has the same deadline as the first wait for SSH, deployConnectTimeoutSeconds).
confirm() {
    local mode=$1 deadline status kind error_text delay=1 attempt=0 command
    local reports=0 last_report=$((SECONDS - PROGRESS_EVERY_SECONDS)) last_error="" quiet
    if [[ $mode == boot ]]; then
        deadline=$((SECONDS + CONNECT_TIMEOUT))
        command=$(remote_command confirm-boot "$DEPLOY_ID" "$ALLOW_FAILED_UNITS" "$ROLLBACK_TIMEOUT")
        log "waiting up to ${CONNECT_TIMEOUT}s for $WHERE to come back with the same host key, then confirming"
    else
        deadline=$((SECONDS + ROLLBACK_TIMEOUT))
        command=$(remote_command confirm "$DEPLOY_ID" "$ALLOW_FAILED_UNITS" "$ROLLBACK_TIMEOUT")
        log "confirming over a new SSH connection"
    fi
    while :; do
        attempt=$((attempt + 1))
        status=0
        wait_for ssh "${SSH_OPTS[@]}" -o ConnectTimeout="$MAX_ATTEMPT_SECONDS" -o ControlMaster=no -o ControlPath=none \
            "$TARGET" "$command" >"$WORK/confirm.out" 2>"$WORK/confirm.err" || status=$?
        error_text=$(last_line "$WORK/confirm.err")
        # A connection that keeps failing the same way is said about as open_master says it.
        quiet=false
        if ((status == SSH_FAILED || status == REMOTE_NOT_REBOOTED)) && ! progress_due "$reports" "$last_report" "$([[ $error_text != "$last_error" ]] && echo true || echo false)"; then
            quiet=true
        fi
        [[ $quiet == true ]] || bounded_log 1024 <"$WORK/confirm.err" >&2
        case $mode:$status in
        *:0) return 0 ;;
        boot:"$REMOTE_ROLLED_BACK")
            fail "the new system on $WHERE did not pass after the reboot, and the host goes back to $ROLLBACK_TARGET, booted (see above)" \
                "$(host_log_hint)" \
                "a degraded system (failed units) fails the deploy unless allowFailedUnits is true; the health check must answer 'ok'"
            ;;
        boot:"$REMOTE_NOT_REBOOTED") ;;
        boot:"$SSH_FAILED")
            if [[ $(classify_ssh_error "$WORK/confirm.err") == auth ]]; then
                fail "after the reboot, $WHERE refused the SSH key for user '$REMOTE_USER' ($(last_line "$WORK/confirm.err")): the new system locked the admin out. Unconfirmed, the host reboots into $ROLLBACK_TARGET by itself within ${ROLLBACK_TIMEOUT}s (rollbackTimeoutSeconds) of its boot" \
                    "wait, then check SSH again; $(host_log_hint)" \
                    "look at what the new configuration changed about users.users.$REMOTE_USER.openssh.authorizedKeys or sshd"
            fi
            ;;
        *:"$REMOTE_ROLLED_BACK")
            fail "the new system on $WHERE failed its checks after the switch and was rolled back to $ROLLBACK_TARGET (see above)" \
                "$(host_log_hint)" \
                "a degraded system (failed units) fails the deploy unless allowFailedUnits is true; the health check must answer 'ok'"
            ;;
        boot:"$REMOTE_ALREADY_ROLLED_BACK")
            fail "the new boot on $WHERE did not hold: the host is back on $ROLLBACK_TARGET, booted, and its records say why (see above)" \
                "$(host_log_hint)" \
                "a new system that panics comes back on the old one at once; one not confirmed within rollbackTimeoutSeconds=${ROLLBACK_TIMEOUT} of its boot reboots into it"
            ;;
        *:"$REMOTE_ALREADY_ROLLED_BACK")
            fail "$WHERE had already rolled back to $ROLLBACK_TARGET before this deploy could confirm (the switch and the confirmation took longer than rollbackTimeoutSeconds=${ROLLBACK_TIMEOUT})" \
                "$(host_log_hint)" "raise rollbackTimeoutSeconds if activation is slow, then run again"
            ;;
        *:"$REMOTE_SUPERSEDED")
            fail "another deploy to $WHERE started before this one (deploy $DEPLOY_ID) was confirmed, and rolled it back to $ROLLBACK_TARGET (see above); the host runs what that other deploy switched to" \
                "run one deploy per host at a time (one 'pulumi up' per stack, not two at once); then run 'pulumi up' again so that the state matches the host"
            ;;
        *:"$COMMAND_NOT_FOUND")
            fail "a command the confirmation needs is missing on $WHERE (exit status 127, 'command not found': see the message above); the host rolls back to $ROLLBACK_TARGET within ${ROLLBACK_TIMEOUT}s unless confirmed" \
                "the new system must keep bash, flock, systemd-run, systemctl and curl on the admin's PATH" "$(host_log_hint)"
            ;;
        *:"$REMOTE_ROLLBACK_FAILED")
            fail "the new system on $WHERE failed its checks AND the rollback to $ROLLBACK_TARGET failed (see above)" \
                "$(host_log_hint)"
            ;;
        *:"$REMOTE_BAD_STATE")
            fail "$WHERE has no rollback armed for deploy $DEPLOY_ID, so it cannot be confirmed; a later deploy may have superseded it (see above)" \
                "$(host_log_hint)"
            ;;
        *:"$SSH_FAILED") ;;
        *)
            fail "confirming the deploy on $WHERE failed (remote exit status $status); the host rolls back to $ROLLBACK_TARGET within ${ROLLBACK_TIMEOUT}s unless confirmed" \
                "$(host_log_hint)"
            ;;
        esac
        kind=$(classify_ssh_error "$WORK/confirm.err")
        ((status == REMOTE_NOT_REBOOTED)) && kind=retry
        if [[ $mode == boot ]] && { [[ $kind != retry ]] || ((SECONDS + delay >= deadline)); }; then
            fail "$WHERE did not come back with the new system within ${CONNECT_TIMEOUT}s (deployConnectTimeoutSeconds) of the reboot (last: ${error_text:0:300}). Unless it is confirmed, the host boots $ROLLBACK_TARGET again by itself: a new boot that reaches userspace reboots into it within ${ROLLBACK_TIMEOUT}s (rollbackTimeoutSeconds), and one that panics comes back on it at once" \
                "check the instance's console output (EC2 'Get system log'); a host that hangs before userspace needs a reboot from outside ('aws ec2 reboot-instances'), which boots $ROLLBACK_TARGET" \
                "$(host_log_hint)"
        fi
        if [[ $kind != retry ]] || ((SECONDS + delay >= deadline)); then
            fail "could not open a new SSH connection to $WHERE after the switch (${error_text:0:300}). The new system may have broken SSH access for the admin; the host rolls itself back to $ROLLBACK_TARGET within ${ROLLBACK_TIMEOUT}s (rollbackTimeoutSeconds) because this deploy was not confirmed" \
                "wait ${ROLLBACK_TIMEOUT}s, then check SSH again; $(host_log_hint)" \
                "look at what the new configuration changed about sshd, the firewall or users.users.$REMOTE_USER.openssh.authorizedKeys"
        fi
        if [[ $quiet == false ]]; then
            log "confirmation attempt $attempt failed (${error_text:0:160}); retrying"
            last_report=$SECONDS
            last_error=$error_text
            reports=$((reports + 1))
        fi
        wait_for sleep "$delay"
        delay=$((delay >= MAX_RETRY_DELAY_SECONDS ? MAX_RETRY_DELAY_SECONDS : delay + 1))
    done
}

print_result() {
    local result
    result=$(last_line "$WORK/confirm.out")
    if [[ ! $result =~ ^\{\"systemPath\":\"/[A-Za-z0-9._+/-]+\",\"generation\":[0-9]+,\"rebooted\":(true|false)\}$ ]]; then
        fail "the host $WHERE confirmed the deploy but returned no valid result line (got '${result:0:200}')" \
            "$(host_log_hint)"
    fi
    log "deploy $DEPLOY_ID confirmed on $WHERE"
    printf '%s\n' "$result"
}

main() {
    take_private_key
    validate_inputs
    trap cleanup EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    make_workdir
    write_credentials
    set_ssh_options
    # Packing the upload overlaps the wait for SSH.
    copy_payload &
    local packing=$!
    open_master
    wait "$packing" || fail "copying $FLAKE_DIR into a temporary upload directory failed (see above)" \
        "check that every file under $FLAKE_DIR is readable and that ${TMPDIR:-/tmp} has space"
    send_secrets
    copy_and_switch
    if [[ -n $BOOT_BEFORE ]]; then
        request_reboot
        close_master
        confirm boot
    else
        close_master
        confirm live
    fi
    print_result
}

main "$@"
