#!/usr/bin/env bash
# Runs on the deployed host, as root. deploy/nixos-deploy.sh ships it in the same tar stream as
# the flake (it ends up in $STATE_DIR/bin) and calls it over SSH. The switch, the confirmation and
# the rollback run as transient systemd units, so a dropped SSH connection cannot stop them half
# way; the SSH sessions only start them and stream their log.
#
#   deploy UPLOAD ID ATTR ROLLBACK_S ALLOW BUILD_S ACTIVATE_S
#                                                   SSH session 1: run the switch unit
#   switch UPLOAD ID ATTR ROLLBACK_S ALLOW BUILD_S ACTIVATE_S LOG
#                                                   (unit) install, build, arm the rollback, switch
#   confirm ID ALLOW SETTLE_S                       SSH session 2: run the confirm unit, print JSON
#   confirm-unit ID ALLOW SETTLE_S LOG              (unit) disarm, wait for systemd, health check
#   rollback ID                                     (timer unit) roll back unless confirmed
#
# State under $STATE_DIR: flake/ and bin/ (the current upload), lock, pending-rollback
# ("<deploy id> <generation>" while a deploy is unconfirmed, empty otherwise), deploys/<id>
# (each deploy's outcome), logs/<time>-<id>.log and deploy.log (a link to the newest log),
# last-rollback, result (the GC root of the newest build).
#
# Commands that may leave processes behind get `9>&-`, so no stray process keeps the lock (fd 9).
set -euo pipefail

# Overridable only so that the integration tests can point them into a test directory.
STATE_DIR=${NIXOS_EC2_STATE_DIR:-/var/lib/nixos-ec2}
SYSTEM_PROFILE=${NIXOS_EC2_SYSTEM_PROFILE:-/nix/var/nix/profiles/system}
HEALTH_URL=${NIXOS_EC2_HEALTH_URL:-http://127.0.0.1/healthz}

readonly PENDING_FILE=$STATE_DIR/pending-rollback
readonly OUTCOMES_DIR=$STATE_DIR/deploys
readonly LOG_DIR=$STATE_DIR/logs
readonly KEEP_LOGS=20
readonly LOCK_WAIT_SECONDS=600
readonly HEALTH_ATTEMPTS=5
readonly HEALTH_REQUEST_SECONDS=10
readonly LOG_TAIL_LINES=40
# Exit statuses read by deploy/nixos-deploy.sh (keep in sync with that file).
readonly EXIT_BUILD_FAILED=20 EXIT_ROLLED_BACK=21 EXIT_ROLLBACK_FAILED=22
readonly EXIT_BUSY=23 EXIT_BAD_STATE=24 EXIT_ALREADY_ROLLED_BACK=25 EXIT_SUPERSEDED=26
readonly EXIT_BUILD_TIMED_OUT=27 EXIT_ACTIVATION_TIMED_OUT=28
# How often a long build or activation says it is still running. Overridable for the tests.
readonly PROGRESS_SECONDS=${NIXOS_EC2_PROGRESS_SECONDS:-60}
# After its deadline a step gets SIGTERM, and SIGKILL this much later.
readonly KILL_AFTER_SECONDS=15

say() {
    printf '[%(%H:%M:%S)T] %s\n' -1 "$*"
}

die() {
    local status=$1
    shift
    say "error: $*" >&2
    exit "$status"
}

rollback_unit() {
    printf 'nixos-ec2-rollback-%s' "$1"
}

log_of() {
    local log
    for log in "$LOG_DIR"/*-"$1".log; do
        if [[ -e $log ]]; then
            printf '%s' "$log"
            return 0
        fi
    done
    printf '%s' "$STATE_DIR/deploy.log"
}

print_log_tail() {
    printf -- '---- last %s lines of %s on %s ----\n' "$LOG_TAIL_LINES" "$1" "${HOSTNAME:-the host}"
    tail -n "$LOG_TAIL_LINES" "$1" 2>/dev/null || true
    printf -- '---- end of log ----\n'
}

# Transient units start with an empty environment: hand over what the scripts and nix need.
unit_environment() {
    local var
    UNIT_ENV=("--setenv=PATH=$PATH")
    for var in NIXOS_EC2_STATE_DIR NIXOS_EC2_SYSTEM_PROFILE NIXOS_EC2_HEALTH_URL NIXOS_EC2_PROGRESS_SECONDS LOCALE_ARCHIVE; do
        if [[ -n ${!var:-} ]]; then
            UNIT_ENV+=("--setenv=$var=${!var}")
        fi
    done
}

# run_unit NAME DESCRIPTION ARGS...: runs this script with ARGS in a transient service and
# waits for it; the service outlives a dropped SSH session. Returns the service's exit status.
run_unit() {
    local name=$1 description=$2
    shift 2
    unit_environment
    systemd-run --unit="$name" --description="$description" --collect --wait --pipe --quiet \
        --service-type=exec "${UNIT_ENV[@]}" -- bash "$SCRIPT" "$@"
}

take_lock() {
    exec 9>>"$STATE_DIR/lock"
    if ! flock -n 9; then
        say "waiting up to ${LOCK_WAIT_SECONDS}s for another deploy or rollback on this host"
        flock -w "$LOCK_WAIT_SECONDS" 9 ||
            die "$EXIT_BUSY" "another deploy or rollback still holds $STATE_DIR/lock after ${LOCK_WAIT_SECONDS}s; wait for it ('systemctl list-units \"nixos-ec2-*\"') and deploy again"
    fi
}

# One short write: a reader under the lock never sees half a line.
record_outcome() {
    printf '%s\n' "$2" >"$OUTCOMES_DIR/$1"
}

current_generation() {
    local link
    link=$(readlink "$SYSTEM_PROFILE") ||
        die "$EXIT_BAD_STATE" "$SYSTEM_PROFILE is not a profile link; is this NixOS?"
    if [[ ! $link =~ -([0-9]+)-link$ ]]; then
        die "$EXIT_BAD_STATE" "cannot read the generation from $SYSTEM_PROFILE -> $link"
    fi
    printf '%s' "${BASH_REMATCH[1]}"
}

# read_pending: sets PENDING_ID and PENDING_GENERATION, both empty when no rollback is armed.
read_pending() {
    PENDING_ID=""
    PENDING_GENERATION=""
    if [[ -s $PENDING_FILE ]]; then
        read -r PENDING_ID PENDING_GENERATION <"$PENDING_FILE" || true
    fi
}

disarm() {
    systemctl stop "$(rollback_unit "$1").timer" >/dev/null 2>&1 || true
    : >"$PENDING_FILE"
}

# roll_back ID GENERATION REASON: back to the generation recorded before the switch. Not
# `nixos-rebuild --rollback`, which goes one generation too far when the switch created none.
roll_back() {
    local id=$1 generation=$2 reason=$3 status=0
    say "rolling back to generation $generation: $reason"
    disarm "$id"
    if ! nix-env -p "$SYSTEM_PROFILE" --switch-generation "$generation"; then
        record_outcome "$id" "rollback-failed generation=$generation reason=$reason"
        say "error: could not switch $SYSTEM_PROFILE back to generation $generation"
        return 1
    fi
    "$SYSTEM_PROFILE/bin/switch-to-configuration" switch 9>&- || status=$?
    case $status in
    0) ;;
    4) say "warning: generation $generation is active again, but some of its units failed to start" ;;
    *)
        record_outcome "$id" "rollback-failed generation=$generation reason=$reason"
        say "error: activating generation $generation again failed (switch-to-configuration exited $status)"
        return 1
        ;;
    esac
    record_outcome "$id" "rolled-back generation=$generation reason=$reason"
    printf '%(%Y-%m-%dT%H:%M:%S%z)T deploy %s rolled back to generation %s: %s\n' -1 "$id" "$generation" "$reason" \
        >"$STATE_DIR/last-rollback"
    say "rolled back to generation $generation"
}

# Uploads of deploys that died are removed by the next deploy's bootstrap (nixos-deploy.sh).
prune_old_files() {
    local logs old id
    shopt -s nullglob
    logs=("$LOG_DIR"/*.log)
    shopt -u nullglob
    if ((${#logs[@]} > KEEP_LOGS)); then
        for old in "${logs[@]:0:${#logs[@]}-KEEP_LOGS}"; do
            id=${old##*-}
            rm -f "$old" "$OUTCOMES_DIR/${id%.log}"
        done
    fi
}

# An earlier deploy that was never confirmed is not trusted: finish its rollback first, so the
# generation this deploy records is the last confirmed one.
roll_back_unconfirmed_deploy() {
    read_pending
    [[ -n $PENDING_ID ]] || return 0
    say "deploy $PENDING_ID was never confirmed; rolling it back before deploy $1"
    roll_back "$PENDING_ID" "$PENDING_GENERATION" "superseded by deploy $1 before it was confirmed" ||
        exit "$EXIT_ROLLBACK_FAILED"
}

# The upload holds new/flake and new/bin. Under the lock nothing else reads $STATE_DIR/flake or
# bin, so two renames (old ones into the upload, new ones into place) replace both; the upload,
# now holding the old copies, is removed afterwards.
install_upload() {
    local upload=$1 old=()
    [[ -f $upload/new/flake/flake.nix ]] || die "$EXIT_BAD_STATE" "the uploaded flake has no flake.nix"
    [[ -e $STATE_DIR/flake ]] && old+=("$STATE_DIR/flake")
    [[ -e $STATE_DIR/bin ]] && old+=("$STATE_DIR/bin")
    if ((${#old[@]} > 0)); then
        mv -t "$upload" "${old[@]}"
    fi
    mv -t "$STATE_DIR" "$upload/new/flake" "$upload/new/bin"
    say "installed the flake in $STATE_DIR/flake"
}

# with_deadline WHAT SECONDS COMMAND...: runs COMMAND under coreutils timeout (which signals
# the command's whole process group), saying every PROGRESS_SECONDS that WHAT still runs.
# Returns COMMAND's status; sets DEADLINE_HIT when the deadline, not something else (the OOM
# killer's SIGKILL also gives 137), stopped it.
DEADLINE_HIT=false
with_deadline() {
    local what=$1 seconds=$2 status=0 ticker started=$SECONDS
    shift 2
    DEADLINE_HIT=false
    # The ticker's sleep holds no descriptor of the log pipe, which the unit and the SSH session
    # wait on: killed between its start and `pause=$!`, it would outlive the ticker.
    (
        pause=""
        trap 'kill "$pause" 2>/dev/null; exit 0' TERM
        elapsed=0
        while :; do
            sleep "$PROGRESS_SECONDS" >/dev/null 2>&1 &
            pause=$!
            wait "$pause"
            elapsed=$((elapsed + PROGRESS_SECONDS))
            say "still $what after ${elapsed}s (deadline ${seconds}s)"
        done
    ) 9>&- &
    ticker=$!
    timeout --kill-after="$KILL_AFTER_SECONDS" "$seconds" "$@" 9>&- || status=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    # timeout exits 124 when its TERM ended the command, 137 when its KILL had to.
    if ((status == 124 || (status == 137 && SECONDS - started >= seconds))); then
        DEADLINE_HIT=true
    fi
    return "$status"
}

build_system() {
    local flake_ref="path:$STATE_DIR/flake#$1" seconds=$2 status=0
    say "building $flake_ref (deadline ${seconds}s)"
    # Flakes are off on the stock image; enable them for these calls only. The build runs in
    # $STATE_DIR so that its ./result link is a GC root for the new system.
    (
        cd "$STATE_DIR"
        export NIX_CONFIG="${NIX_CONFIG:+$NIX_CONFIG$'\n'}extra-experimental-features = nix-command flakes"
        status=0
        with_deadline building "$seconds" nixos-rebuild build --flake "$flake_ref" || status=$?
        # Out of this subshell, only the status tells: 124 means the deadline, whatever timeout said.
        if [[ $DEADLINE_HIT == true ]]; then exit 124; fi
        ((status != 124)) || status=1
        exit "$status"
    ) || status=$?
    if ((status == 124)); then
        die "$EXIT_BUILD_TIMED_OUT" "building $flake_ref did not finish within ${seconds}s (buildTimeoutSeconds) and was stopped; this host was not changed"
    elif ((status != 0)); then
        die "$EXIT_BUILD_FAILED" "building $flake_ref failed; this host was not changed"
    fi
    cd -P "$STATE_DIR/result" 2>/dev/null ||
        die "$EXIT_BUILD_FAILED" "nixos-rebuild build left no $STATE_DIR/result link"
    NEW_SYSTEM=$PWD
    cd /
}

arm_rollback() {
    local id=$1 generation=$2 seconds=$3
    printf '%s %s\n' "$id" "$generation" >"$PENDING_FILE"
    unit_environment
    systemd-run --unit="$(rollback_unit "$id")" --description="nixos-ec2: roll back deploy $id unless confirmed" \
        --collect --quiet --on-active="${seconds}s" --timer-property=AccuracySec=1s \
        "${UNIT_ENV[@]}" -- bash "$STATE_DIR/bin/remote-switch.sh" rollback "$id" 9>&- || {
        : >"$PENDING_FILE"
        die "$EXIT_BAD_STATE" "could not arm the rollback timer; nothing was switched"
    }
    say "recorded generation $generation; rollback armed for ${seconds}s unless confirmed"
}

# nixos-rebuild switch = set the profile + switch-to-configuration. Doing the two steps here
# keeps switch-to-configuration's exit status 4 (units failed) visible: nixos-rebuild-ng
# reports every failed command as exit status 1.
activate() {
    local id=$1 previous=$2 allow=$3 seconds=$4 status=0 reason
    if nix-env -p "$SYSTEM_PROFILE" --set "$NEW_SYSTEM"; then
        say "activating $NEW_SYSTEM (deadline ${seconds}s)"
        with_deadline activating "$seconds" "$NEW_SYSTEM/bin/switch-to-configuration" switch || status=$?
    else
        status=$?
        say "error: nix-env could not set $SYSTEM_PROFILE to $NEW_SYSTEM"
    fi
    if ((status == 0)); then
        return 0
    fi
    if ((status == 4)) && [[ $allow == true ]]; then
        say "warning: some units failed to start (switch-to-configuration exited 4); keeping the new system because allowFailedUnits is true"
        return 0
    fi
    if ((status == 4)); then
        reason="some units failed to start (switch-to-configuration exited 4; allowFailedUnits is false)"
    elif [[ $DEADLINE_HIT == true ]]; then
        reason="activation did not finish within ${seconds}s (activationTimeoutSeconds) and was stopped"
    else
        reason="activation failed (exit status $status)"
    fi
    say "error: $reason"
    roll_back "$id" "$previous" "$reason" || exit "$EXIT_ROLLBACK_FAILED"
    if [[ $DEADLINE_HIT == true ]]; then
        exit "$EXIT_ACTIVATION_TIMED_OUT"
    fi
    exit "$EXIT_ROLLED_BACK"
}

# Globals, not locals: the EXIT traps below run after switch_body has returned.
UPLOAD=""
DEPLOY_ID=""
PREVIOUS_GENERATION=""

on_switch_exit() {
    local status=$1
    rm -rf "$UPLOAD"
    if [[ -n $PREVIOUS_GENERATION ]] && ((status != 0 && status != EXIT_ROLLED_BACK && status != EXIT_ROLLBACK_FAILED && status != EXIT_ACTIVATION_TIMED_OUT)); then
        roll_back "$DEPLOY_ID" "$PREVIOUS_GENERATION" "the switch step failed unexpectedly (exit status $status)" ||
            exit "$EXIT_ROLLBACK_FAILED"
        exit "$EXIT_ROLLED_BACK"
    fi
}

switch_body() {
    local attr=$3 rollback_seconds=$4 allow=$5 build_seconds=$6 activate_seconds=$7
    UPLOAD=$1
    DEPLOY_ID=$2
    trap 'on_switch_exit $?' EXIT
    say "deploy $DEPLOY_ID: switching this host to $attr"
    take_lock
    [[ -d $OUTCOMES_DIR ]] || mkdir -p "$OUTCOMES_DIR"
    prune_old_files
    roll_back_unconfirmed_deploy "$DEPLOY_ID"
    install_upload "$UPLOAD" "$DEPLOY_ID"
    build_system "$attr" "$build_seconds"
    local previous
    previous=$(current_generation)
    arm_rollback "$DEPLOY_ID" "$previous" "$rollback_seconds"
    # From here on an unexpected failure rolls back at once instead of waiting for the timer.
    PREVIOUS_GENERATION=$previous
    activate "$DEPLOY_ID" "$previous" "$allow" "$activate_seconds"
    local generation
    generation=$(current_generation)
    record_outcome "$DEPLOY_ID" "switched generation=$generation"
    say "switched to generation $generation"
}

settle() {
    local allow=$1 seconds=$2 state
    state=$(timeout "$seconds" systemctl is-system-running --wait 2>&1) || true
    state=${state##*$'\n'}
    case $state in
    running)
        say "systemd reports the system as running"
        ;;
    degraded)
        systemctl --failed --no-legend --no-pager 2>&1 || true
        if [[ $allow == true ]]; then
            say "warning: the system is degraded (units failed); accepted because allowFailedUnits is true"
        else
            SETTLE_FAILURE="the system is degraded: units failed (listed above; allowFailedUnits is false)"
            return 1
        fi
        ;;
    *)
        SETTLE_FAILURE="the system did not settle within ${seconds}s (systemctl is-system-running: ${state:-no answer})"
        return 1
        ;;
    esac
}

check_health() {
    local attempt body=""
    for ((attempt = 1; attempt <= HEALTH_ATTEMPTS; attempt++)); do
        if body=$(curl -fsS --max-time "$HEALTH_REQUEST_SECONDS" "$HEALTH_URL" 2>&1) &&
            [[ ${body//[[:space:]]/} == ok ]]; then
            say "health check $HEALTH_URL answered ok"
            return 0
        fi
        if ((attempt < HEALTH_ATTEMPTS)); then
            sleep 1
        fi
    done
    HEALTH_FAILURE="health check $HEALTH_URL failed after $HEALTH_ATTEMPTS attempts: ${body:0:300}"
    return 1
}

confirm_body() {
    local id=$1 allow=$2 settle_seconds=$3 outcome="" generation
    take_lock
    if [[ -f $OUTCOMES_DIR/$id ]]; then
        outcome=$(<"$OUTCOMES_DIR/$id")
    fi
    case $outcome in
    confirmed*)
        say "deploy $id was already confirmed"
        return 0
        ;;
    "rolled-back "*"reason=superseded by deploy"*)
        die "$EXIT_SUPERSEDED" "deploy $id cannot be confirmed: a later deploy rolled it back ($outcome)"
        ;;
    rolled-back* | rollback-failed*)
        die "$EXIT_ALREADY_ROLLED_BACK" "deploy $id cannot be confirmed: $outcome"
        ;;
    esac
    read_pending
    if [[ $PENDING_ID != "$id" ]]; then
        die "$EXIT_BAD_STATE" "no rollback is armed for deploy $id (pending: ${PENDING_ID:-none}); a later deploy may have superseded it"
    fi
    generation=$PENDING_GENERATION
    disarm "$id"
    say "deploy $id: rollback disarmed; checking the new system"
    SETTLE_FAILURE=""
    HEALTH_FAILURE=""
    if ! settle "$allow" "$settle_seconds" || ! check_health; then
        say "error: ${SETTLE_FAILURE:-$HEALTH_FAILURE}"
        roll_back "$id" "$generation" "${SETTLE_FAILURE:-$HEALTH_FAILURE}" || exit "$EXIT_ROLLBACK_FAILED"
        exit "$EXIT_ROLLED_BACK"
    fi
    record_outcome "$id" "confirmed generation=$(current_generation)"
    say "deploy $id confirmed"
}

rollback_body() {
    local id=$1
    take_lock
    read_pending
    if [[ $PENDING_ID != "$id" ]]; then
        say "deploy $id was confirmed or already rolled back; nothing to do"
        return 0
    fi
    roll_back "$id" "$PENDING_GENERATION" "deploy $id was not confirmed within the rollback timeout"
}

# with_log LOG FUNCTION ARGS...: FUNCTION's output goes to LOG and to stderr (the SSH session
# while it lasts; `tee -p` keeps writing the log after the session is gone).
with_log() {
    local log=$1 statuses
    shift
    set +e
    "$@" 2>&1 | tee -p -a "$log" >&2
    statuses=("${PIPESTATUS[@]}")
    set -e
    return "${statuses[0]}"
}

cmd_deploy() {
    local upload=$1 id=$2 attr=$3 rollback_seconds=$4 allow=$5 build_seconds=$6 activate_seconds=$7 log status=0 generation=""
    [[ -d $LOG_DIR ]] || mkdir -p "$LOG_DIR"
    log=$LOG_DIR/$(printf '%(%Y%m%dT%H%M%S)T' -1)-$id.log
    : >"$log"
    ln -sfn "logs/${log##*/}" "$STATE_DIR/deploy.log"
    # First stdout line: nixos-deploy.sh points its hints at this log only once it exists.
    printf 'log=%s\n' "$log"
    run_unit "nixos-ec2-switch-$id" "nixos-ec2: deploy $id, switch to $attr" \
        switch "$upload" "$id" "$attr" "$rollback_seconds" "$allow" "$build_seconds" "$activate_seconds" "$log" || status=$?
    # nixos-deploy.sh names the generation a rollback returns to in its messages.
    read_pending
    if [[ $PENDING_ID == "$id" ]]; then
        generation=$PENDING_GENERATION
    elif [[ -f $OUTCOMES_DIR/$id && $(<"$OUTCOMES_DIR/$id") =~ generation=([0-9]+) ]]; then
        generation=${BASH_REMATCH[1]}
    fi
    printf '%s\n' "$generation"
    if ((status != 0)); then
        print_log_tail "$log" >&2
    fi
    exit "$status"
}

cmd_confirm() {
    local id=$1 allow=$2 settle_seconds=$3 log status=0 path generation
    log=$(log_of "$id")
    run_unit "nixos-ec2-confirm-$id-$$" "nixos-ec2: confirm deploy $id" \
        confirm-unit "$id" "$allow" "$settle_seconds" "$log" || status=$?
    if ((status != 0)); then
        print_log_tail "$log" >&2
        exit "$status"
    fi
    generation=$(current_generation)
    cd -P "$SYSTEM_PROFILE"
    path=$PWD
    printf '{"systemPath":"%s","generation":%s}\n' "$path" "$generation"
}

usage() {
    die 64 "usage: remote-switch.sh deploy|switch|confirm|confirm-unit|rollback ARGS... (called by nixos-deploy.sh)"
}

# need_args COUNT ARGS...: the callers are scripts, so a wrong count is a version mismatch.
need_args() {
    local count=$1
    shift
    if (($# != count)); then
        usage
    fi
}

main() {
    # Absolute in every call (the bootstrap, run_unit, the timer); units run it by this path.
    SCRIPT=${BASH_SOURCE[0]}
    [[ $SCRIPT == /* ]] || die 64 "run remote-switch.sh by its absolute path"
    local command=${1:-}
    shift || true
    case $command in
    deploy)
        need_args 7 "$@"
        cmd_deploy "$@"
        ;;
    switch)
        need_args 8 "$@"
        with_log "$8" switch_body "${@:1:7}"
        ;;
    confirm)
        need_args 3 "$@"
        cmd_confirm "$@"
        ;;
    confirm-unit)
        need_args 4 "$@"
        with_log "$4" confirm_body "${@:1:3}"
        ;;
    rollback)
        need_args 1 "$@"
        with_log "$(log_of "$1")" rollback_body "$1"
        ;;
    *) usage ;;
    esac
}

main "$@"
