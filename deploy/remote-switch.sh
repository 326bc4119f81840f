#!/usr/bin/env bash
# Runs on the deployed host, as root. deploy/nixos-deploy.sh ships it in the same tar stream as
# the flake (it ends up in $STATE_DIR/bin) and calls it over SSH. The switch, the confirmation and
# the rollback run as transient systemd units, so a dropped SSH connection cannot stop them half
# way; the SSH sessions only start them and stream their log.
#
#   deploy UPLOAD ID ATTR ROLLBACK_S ALLOW BUILD_S ACTIVATE_S REBOOT_POLICY SECRETS
#                                                   SSH session 1: run the switch unit
#   switch UPLOAD ID ATTR ROLLBACK_S ALLOW BUILD_S ACTIVATE_S REBOOT_POLICY SECRETS LOG
#                                                   (unit) install, build, arm the rollback, then
#                                                   switch live or prepare a boot of the new system
#                                                   (SECRETS: the names of the host secrets this
#                                                   deploy sent, comma-separated, or "-")
#   reboot ID                                       SSH session 1 again: reboot into the new system
#   confirm ID ALLOW SETTLE_S                       SSH session 2: run the confirm unit, print JSON
#   confirm-unit ID ALLOW SETTLE_S LOG              (unit) disarm, wait for systemd, health check
#   confirm-boot ID ALLOW SETTLE_S                  SSH session 2 after a reboot: the same checks,
#   confirm-boot-unit ID ALLOW SETTLE_S LOG         (unit) then make the new system the default
#   rollback ID                                     (timer unit) roll back unless confirmed
#   boot-guard                                      (nixos-ec2-boot-guard.service, at every boot)
#
# A switch that cannot be done live (a pre-switch check refuses it, or the new init needs a
# reboot) goes through a reboot, as `nixos-rebuild boot` would, with a rollback that survives it:
# the new generation is booted ONCE (GRUB's one-shot next_entry) while the recorded generation
# stays GRUB's default. A new boot that panics (the EC2 image boots with panic=1) or is rebooted
# by anyone comes back on the recorded generation; one that reaches userspace starts
# nixos-ec2-boot-guard.service (nix/modules/boot-guard.nix), which arms the same rollback timer
# as a live switch: unconfirmed, the host reboots into the recorded generation by itself.
#
# State under $STATE_DIR: flake/ and bin/ (the current upload), lock, pending-rollback
# ("<deploy id> <generation>" while a deploy is unconfirmed, empty otherwise), pending-boot
# ("<deploy id> <generation> <new generation> <new system> <boot id> <window s>" while a deploy
# waits for its reboot and confirmation), deploys/<id> (each deploy's outcome),
# logs/<time>-<id>.log and deploy.log (a link to the newest log), last-rollback, result (the GC
# root of the newest build); the host secrets (see "Host secrets" below).
#
# Commands that may leave processes behind get `9>&-`, so no stray process keeps the lock (fd 9).
set -euo pipefail

# Overridable only so that the integration tests can point them into a test directory.
STATE_DIR=${NIXOS_EC2_STATE_DIR:-/var/lib/nixos-ec2}
SYSTEM_PROFILE=${NIXOS_EC2_SYSTEM_PROFILE:-/nix/var/nix/profiles/system}
HEALTH_URL=${NIXOS_EC2_HEALTH_URL:-http://127.0.0.1/healthz}
RUN_DIR=${NIXOS_EC2_RUN_DIR:-/run}
BOOT_ID_FILE=${NIXOS_EC2_BOOT_ID_FILE:-/proc/sys/kernel/random/boot_id}
GRUB_DIR=${NIXOS_EC2_GRUB_DIR:-/boot/grub}
ACME_DIR=${NIXOS_EC2_ACME_DIR:-/var/lib/acme}

readonly PENDING_FILE=$STATE_DIR/pending-rollback
readonly PENDING_BOOT_FILE=$STATE_DIR/pending-boot
# nix/modules/boot-guard.nix installs it; a new system without it cannot be booted on trial.
readonly BOOT_GUARD_UNIT=nixos-ec2-boot-guard.service
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
readonly EXIT_BUILD_TIMED_OUT=27 EXIT_ACTIVATION_TIMED_OUT=28 EXIT_REBOOT_REFUSED=29
readonly EXIT_NOT_REBOOTED=32 EXIT_BAD_SECRETS=34
# switch-to-configuration-ng (pkgs/by-name/sw/switch-to-configuration-ng/src/main.rs): exit 100
# when the new init interface needs a reboot (after it installed the boot loader).
readonly SWITCH_NEEDS_REBOOT=100
# How often a long build or activation says it is still running. Overridable for the tests.
readonly PROGRESS_SECONDS=${NIXOS_EC2_PROGRESS_SECONDS:-60}
# After its deadline a step gets SIGTERM, and SIGKILL this much later.
readonly KILL_AFTER_SECONDS=15

# Host secrets. Each deploy's secrets are one set, the directory secrets.d/<deploy id> (0700, each
# secret a 0400 file named after it), and $STATE_DIR/secrets is a link to the set in use: services
# read /var/lib/nixos-ec2/secrets/<name> (nix/modules/secrets.nix loads it with LoadCredential=).
# The link is replaced by a rename, so it always names one whole set (as sops-nix switches
# /run/secrets, atomicSymlink in pkgs/sops-install-secrets/main.go). A deploy's set goes live with
# its system: just before a live activation, or in the new boot (boot-guard). pending-secrets holds
# "<deploy id> <set in use before, or ->" until the deploy is confirmed (the old set goes) or rolled
# back (the link goes back to the old set first, and the new set goes). nixos-deploy.sh sends the
# set into secrets.d/.incoming.<deploy id> over the deploy's SSH connection; no secret is ever in a
# file outside secrets.d.
readonly SECRETS_LINK=$STATE_DIR/secrets
readonly SECRET_SETS=$STATE_DIR/secrets.d
readonly PENDING_SECRETS_FILE=$STATE_DIR/pending-secrets
# nix/modules/secrets.nix writes "<secret> <unit>..." here for each secret a system uses.
readonly SECRET_UNITS_FILE=etc/nixos-ec2/secret-units
# The same pattern as SECRET_NAME_PATTERN in lib/hostSecrets.ts (a test keeps them equal).
readonly SECRET_NAME_PATTERN='^[A-Za-z][A-Za-z0-9_-]{0,62}$'
# An incoming set this old belongs to a deploy that died: a deploy moves its set out of the way of
# this sweep (to .received.<id>) as soon as it holds the lock, within the lock wait of receiving it.
readonly STALE_INCOMING_MINUTES=120
readonly EXIT_SECRETS_MISSING=33
# How long the restart of the units that use changed secrets may take in a rollback.
readonly SECRET_RESTART_SECONDS=120

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
    for var in NIXOS_EC2_STATE_DIR NIXOS_EC2_SYSTEM_PROFILE NIXOS_EC2_HEALTH_URL NIXOS_EC2_PROGRESS_SECONDS \
        NIXOS_EC2_RUN_DIR NIXOS_EC2_BOOT_ID_FILE NIXOS_EC2_GRUB_DIR NIXOS_EC2_ACME_DIR LOCALE_ARCHIVE; do
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
            die "$EXIT_BUSY" "another deploy, a rollback or the nightly upgrade (nixos-upgrade.service) still holds $STATE_DIR/lock after ${LOCK_WAIT_SECONDS}s; wait for it ('systemctl list-units \"nixos-ec2-*\" nixos-upgrade.service') and deploy again"
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
    read_pending_boot
    if [[ $PB_ID == "$id" ]]; then
        if [[ $PB_BOOT == "$(boot_id)" ]]; then
            undo_boot "$id" "$generation" "$reason"
        else
            reboot_back "$id" "$generation" "$reason"
        fi
        return
    fi
    say "rolling back to generation $generation: $reason"
    disarm "$id"
    secrets_back "$id"
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
    if [[ $SECRETS_WERE_LIVE == true ]]; then
        restart_secret_users "$SYSTEM_PROFILE" "$id" "$PS_PREVIOUS" ||
            say "warning: generation $generation is active again, but restarting the units that use the secrets it had before failed"
    fi
    forget_secrets "$id" drop
    note_rollback "$id" "$generation" "$reason"
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
    read_pending_boot
    if [[ $PB_ID == "$PENDING_ID" && $PB_BOOT != "$(boot_id)" ]]; then
        if [[ $(readlink -f "$RUN_DIR/booted-system" || true) == "$PB_SYSTEM" ]]; then
            die "$EXIT_BUSY" "deploy $PB_ID booted generation $PB_GENERATION on trial and waits for its confirmation; unconfirmed, the host reboots into generation $PB_PREVIOUS within ${PB_WINDOW}s of that boot. Deploy again after that"
        fi
        # The trial boot did not come up (or the host was rebooted since), and the system booted
        # had no boot guard to say so.
        record_failed_trial "$(readlink -f "$RUN_DIR/booted-system" || true)"
        return 0
    fi
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
    arm_timer "$id" "$seconds"
    say "recorded generation $generation; rollback armed for ${seconds}s unless confirmed"
}

arm_timer() {
    local id=$1 seconds=$2
    unit_environment
    systemd-run --unit="$(rollback_unit "$id")" --description="nixos-ec2: roll back deploy $id unless confirmed" \
        --collect --quiet --on-active="${seconds}s" --timer-property=AccuracySec=1s \
        "${UNIT_ENV[@]}" -- bash "$STATE_DIR/bin/remote-switch.sh" rollback "$id" 9>&- || {
        : >"$PENDING_FILE"
        die "$EXIT_BAD_STATE" "could not arm the rollback timer; nothing was switched"
    }
}

# What pre-switch-check.nix prints when the switch inhibitors (switchable-system.nix) refuse a
# live switch; other pre-switch checks are failures, which a reboot would not cure.
readonly INHIBITOR_REFUSAL="Pre-switch check 'switchInhibitors' failed"

# nixos-rebuild switch = set the profile + switch-to-configuration (nixos-rebuild-ng runs the
# latter under `systemd-run` and exits with its status). Doing the two steps here, inside this
# script's own unit, puts them under the lock, the deadline and the armed rollback, and lets the
# output of a refused live switch be read. Sets REBOOT_REASON when the switch says it cannot be
# done live (exit 100, or a pre-switch check): the running system is then unchanged.
activate() {
    local id=$1 previous=$2 allow=$3 seconds=$4 status=0 reason out=$STATE_DIR/activation.out
    if nix-env -p "$SYSTEM_PROFILE" --set "$NEW_SYSTEM"; then
        say "activating $NEW_SYSTEM (deadline ${seconds}s)"
        # shellcheck disable=SC2016 # expanded by the inner bash
        with_deadline activating "$seconds" bash -c '"$@" 2>&1 | tee "$0"; exit "${PIPESTATUS[0]}"' \
            "$out" "$NEW_SYSTEM/bin/switch-to-configuration" switch || status=$?
    else
        status=$?
        say "error: nix-env could not set $SYSTEM_PROFILE to $NEW_SYSTEM"
    fi
    if ((status == SWITCH_NEEDS_REBOOT)); then
        REBOOT_REASON="switch-to-configuration exited 100: the new init needs a reboot to take effect"
    elif ((status == 1)) && grep -qF "$INHIBITOR_REFUSAL" "$out" 2>/dev/null; then
        REBOOT_REASON="the pre-switch check refused a live switch (a critical component such as dbus changes; see above)"
    fi
    rm -f "$out"
    if ((status == 0)) || [[ -n $REBOOT_REASON ]]; then
        return 0
    fi
    if ((status == 4)) && only_pending_certificates; then
        say "the only units that failed are orders of certificates not issued yet; keeping the new system"
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

boot_id() {
    local id
    read -r id <"$BOOT_ID_FILE" || die "$EXIT_BAD_STATE" "cannot read the boot ID from $BOOT_ID_FILE"
    printf '%s' "$id"
}

system_of_generation() {
    readlink -f "$SYSTEM_PROFILE-$1-link" || die "$EXIT_BAD_STATE" "generation $1 has no $SYSTEM_PROFILE-$1-link"
}

# The check nixos-rebuild-ng makes before it sets the profile (nixos_rebuild/nix.py, set_profile:
# `test -f <toplevel>/nixos-version`): a build that is not a NixOS system is never activated.
check_nixos_system() {
    [[ -f $NEW_SYSTEM/nixos-version ]] ||
        die "$EXIT_BAD_STATE" "$NEW_SYSTEM has no nixos-version file, so it is not a NixOS system (is #$1 a nixosConfigurations entry?); this host was not changed"
}

# needs_reboot POLICY SECONDS: sets REBOOT_REASON when the new system cannot be switched to live
# (or POLICY is always), empty otherwise. Read from switch-to-configuration-ng's main.rs: it exits
# 100 when <toplevel>/init-interface-version differs from /run/current-system's, and its `check`
# action runs only the pre-switch checks (the switch inhibitors of switchable-system.nix among
# them), which print "Pre-switch check ... failed" and exit 1.
REBOOT_REASON=""
needs_reboot() {
    local policy=$1 seconds=$2 new_init running_init="" out status=0
    REBOOT_REASON=""
    if [[ $policy == always ]]; then
        REBOOT_REASON="rebootPolicy is always"
        return 0
    fi
    read -r new_init <"$NEW_SYSTEM/init-interface-version" 2>/dev/null || new_init=""
    if [[ -f $RUN_DIR/current-system/init-interface-version ]]; then
        read -r running_init <"$RUN_DIR/current-system/init-interface-version" || true
    fi
    if [[ -n $new_init && $new_init != "$running_init" ]]; then
        REBOOT_REASON="the new init interface ($new_init) differs from the running one (${running_init:-none}), so the new system takes effect only after a reboot"
        return 0
    fi
    out=$(timeout --kill-after="$KILL_AFTER_SECONDS" "$seconds" "$NEW_SYSTEM/bin/switch-to-configuration" check 2>&1 9>&-) || status=$?
    if ((status == 0)); then
        return 0
    fi
    printf '%s\n' "$out"
    if [[ $out == *"$INHIBITOR_REFUSAL"* ]]; then
        REBOOT_REASON="the pre-switch check refuses a live switch (a critical component such as dbus changes; see above)"
    else
        # Another pre-switch check failed (the live switch fails on it too and rolls back), or an
        # older switch-to-configuration has no `check`: the live switch tells.
        say "switch-to-configuration check exited $status; trying the live switch"
    fi
}

# The title path GRUB's one-shot next_entry takes for GENERATION, read from the grub.cfg that
# install-grub.pl (nixos/modules/system/boot/loader/grub/install-grub.pl) writes: a submenu
# "NixOS - All configurations" of entries "NixOS - Configuration N (DATE - VERSION)".
grub_entry_for() {
    local generation=$1 line submenu="" title pattern
    pattern="^[[:space:]]*menuentry \"([^\"]* - Configuration $generation \\([^\"]*)\""
    while IFS= read -r line; do
        if [[ $line =~ ^[[:space:]]*submenu\ \"([^\"]*)\" ]]; then
            submenu=${BASH_REMATCH[1]}
        elif [[ -n $submenu && $line =~ $pattern ]]; then
            title=${BASH_REMATCH[1]}
            printf '%s>%s' "$submenu" "$title"
            return 0
        fi
    done <"$GRUB_DIR/grub.cfg"
    return 1
}

# grub-editenv: the running system's, or the new one's (nix/modules/boot-guard.nix puts it in
# sw/bin), or, later in a trial, the one recorded in pending-boot. GRUB's module leaves it off PATH
# on EFI installs (grub.nix: grub = null for device "nodev"), so the stock aarch64 image has none.
GRUB_EDITENV=""
find_grub_editenv() {
    local candidate
    for candidate in "$(command -v grub-editenv || true)" "${NEW_SYSTEM:+$NEW_SYSTEM/sw/bin/grub-editenv}" "${PB_EDITENV:-}"; do
        if [[ -n $candidate && -x $candidate ]]; then
            GRUB_EDITENV=$candidate
            return 0
        fi
    done
    return 1
}

grub_editenv() {
    if [[ -z $GRUB_EDITENV ]] && ! find_grub_editenv; then
        say "error: no grub-editenv on this host"
        return 1
    fi
    "$GRUB_EDITENV" "$GRUB_DIR/grubenv" "$@" 9>&-
}

# What a boot on trial needs from the host and the new system; checked before anything changes.
check_trial_boot_possible() {
    [[ -e $NEW_SYSTEM/etc/systemd/system/$BOOT_GUARD_UNIT ]] ||
        die "$EXIT_BAD_STATE" "the new system has no $BOOT_GUARD_UNIT (nix/modules/boot-guard.nix), which a reboot's rollback needs; nothing was changed"
    if [[ ! -f $GRUB_DIR/grub.cfg ]] || ! find_grub_editenv; then
        die "$EXIT_BAD_STATE" "no GRUB ($GRUB_DIR/grub.cfg) or no grub-editenv here, which a reboot's rollback needs; nothing was changed"
    fi
}

# prepare_boot ID PREVIOUS SECONDS: makes the new system bootable ONCE and leaves the running
# system and the boot default alone. The new generation's link joins the profile (so the boot
# loader lists it), the profile goes back to PREVIOUS, and PREVIOUS's own switch-to-configuration
# reinstalls the boot loader with PREVIOUS as the default (install-grub.pl makes the toplevel it
# is given the default entry); then next_entry names the new generation for the next boot only.
prepare_boot() {
    local id=$1 previous=$2 seconds=$3 old_system generation entry
    check_trial_boot_possible
    old_system=$(system_of_generation "$previous")
    printf '%s %s\n' "$id" "$previous" >"$PENDING_FILE"
    nix-env -p "$SYSTEM_PROFILE" --set "$NEW_SYSTEM" 9>&- ||
        die "$EXIT_BAD_STATE" "nix-env could not add $NEW_SYSTEM to $SYSTEM_PROFILE"
    generation=$(current_generation)
    nix-env -p "$SYSTEM_PROFILE" --switch-generation "$previous" 9>&- ||
        die "$EXIT_BAD_STATE" "nix-env could not switch $SYSTEM_PROFILE back to generation $previous"
    say "installing the boot loader with generation $previous as the default (deadline ${seconds}s)"
    with_deadline "installing the boot loader" "$seconds" "$old_system/bin/switch-to-configuration" boot ||
        die "$EXIT_BAD_STATE" "installing the boot loader failed; the running system was not changed"
    entry=$(grub_entry_for "$generation") ||
        die "$EXIT_BAD_STATE" "$GRUB_DIR/grub.cfg lists no entry for generation $generation; the running system was not changed"
    printf '%s %s %s %s %s %s %s\n' "$id" "$previous" "$generation" "$NEW_SYSTEM" "$(boot_id)" "$ROLLBACK_SECONDS" "$GRUB_EDITENV" >"$PENDING_BOOT_FILE"
    grub_editenv set "next_entry=$entry" ||
        die "$EXIT_BAD_STATE" "grub-editenv could not set the one-shot boot entry; the running system was not changed"
    record_outcome "$id" "rebooting generation=$generation"
    say "generation $generation ($entry) will be booted once; generation $previous stays the boot default until the new boot is confirmed"
}

# read_pending_boot: sets PB_ID PB_PREVIOUS PB_GENERATION PB_SYSTEM PB_BOOT PB_WINDOW PB_EDITENV
# (empty when no deploy waits for a reboot).
read_pending_boot() {
    PB_ID="" PB_PREVIOUS="" PB_GENERATION="" PB_SYSTEM="" PB_BOOT="" PB_WINDOW="" PB_EDITENV=""
    if [[ -s $PENDING_BOOT_FILE ]]; then
        read -r PB_ID PB_PREVIOUS PB_GENERATION PB_SYSTEM PB_BOOT PB_WINDOW PB_EDITENV <"$PENDING_BOOT_FILE" || true
    fi
}

forget_boot() {
    rm -f "$PENDING_BOOT_FILE"
    : >"$PENDING_FILE"
}

note_rollback() {
    record_outcome "$1" "rolled-back generation=$2 reason=$3"
    printf '%(%Y-%m-%dT%H:%M:%S%z)T deploy %s rolled back to generation %s: %s\n' -1 "$1" "$2" "$3" \
        >"$STATE_DIR/last-rollback"
}

# undo_boot ID GENERATION REASON: in the boot that prepared it (the host did not reboot), drop
# the one-shot entry and make sure GENERATION is the profile and the boot default again.
undo_boot() {
    local id=$1 generation=$2 reason=$3
    say "undoing the prepared reboot: $reason"
    disarm "$id"
    secrets_back "$id"
    grub_editenv unset next_entry || say "warning: could not clear GRUB's next_entry"
    if ! nix-env -p "$SYSTEM_PROFILE" --switch-generation "$generation" 9>&- ||
        ! "$(system_of_generation "$generation")/bin/switch-to-configuration" boot 9>&-; then
        record_outcome "$id" "rollback-failed generation=$generation reason=$reason"
        say "error: could not make generation $generation the profile and the boot default again"
        return 1
    fi
    forget_boot
    forget_secrets "$id" drop
    note_rollback "$id" "$generation" "$reason"
    say "rolled back to generation $generation (the running system was never changed)"
}

# reboot_back ID GENERATION REASON: on the new system, booted on trial, reboot into GENERATION,
# which is still the boot default.
reboot_back() {
    local id=$1 generation=$2 reason=$3
    say "rolling back to generation $generation by a reboot: $reason"
    disarm "$id"
    # GRUB clears it at boot, unless it cannot write its environment block (LVM, RAID, ...).
    grub_editenv unset next_entry || say "warning: could not clear GRUB's next_entry"
    # The previous generation boots with the secrets it had.
    secrets_back "$id"
    forget_secrets "$id" drop
    nix-env -p "$SYSTEM_PROFILE" --switch-generation "$generation" 9>&- || say "warning: nix-env could not switch $SYSTEM_PROFILE to generation $generation"
    "$(system_of_generation "$generation")/bin/switch-to-configuration" boot 9>&- || say "warning: reinstalling the boot loader for generation $generation failed; it should still be the default"
    forget_boot
    note_rollback "$id" "$generation" "$reason"
    # In a moment, so that this unit and the SSH session that waits for it can end first.
    unit_environment
    systemd-run --unit="nixos-ec2-reboot-$id" --description="nixos-ec2: reboot into generation $generation" \
        --collect --quiet --on-active=2s --timer-property=AccuracySec=1s "${UNIT_ENV[@]}" -- systemctl reboot 9>&- ||
        systemctl reboot 9>&-
    say "rebooting into generation $generation"
}

# secret_set_in_use: the set the secrets link names, or "-" when there is none.
secret_set_in_use() {
    local target
    target=$(readlink "$SECRETS_LINK" 2>/dev/null) || {
        printf -- '-'
        return 0
    }
    printf '%s' "${target##*/}"
}

# point_secrets_at SET: the link names SET ("-": no link), replaced by a rename, never missing.
point_secrets_at() {
    local set=$1 link=$STATE_DIR/.secrets.link.$$
    if [[ $set == - ]]; then
        rm -f "$SECRETS_LINK"
        return 0
    fi
    ln -sfn "secrets.d/$set" "$link"
    mv -T "$link" "$SECRETS_LINK"
}

# read_pending_secrets: sets PS_ID and PS_PREVIOUS, empty when no deploy's set is pending.
read_pending_secrets() {
    PS_ID="" PS_PREVIOUS=""
    if [[ -s $PENDING_SECRETS_FILE ]]; then
        read -r PS_ID PS_PREVIOUS <"$PENDING_SECRETS_FILE" || true
    fi
}

# check_incoming_secrets ID NAMES: the secrets deploy ID sent arrived, exactly NAMES ("a,b" or "-").
check_incoming_secrets() {
    local id=$1 names=$2 incoming=$SECRET_SETS/.incoming.$1 name file arrived=()
    if [[ $names == - ]]; then
        if [[ -e $incoming ]]; then rm -rf "$incoming"; fi
        say "this host gets no secrets from this deploy"
        return 0
    fi
    local expected=()
    IFS=, read -r -a expected <<<"$names"
    for name in "${expected[@]}"; do
        [[ $name =~ $SECRET_NAME_PATTERN ]] || die "$EXIT_BAD_SECRETS" "the deploy named a secret ${name:0:80}, which is not a secret name; nothing was changed"
        [[ -f $incoming/$name ]] || die "$EXIT_BAD_SECRETS" "secret $name did not arrive in $incoming; nothing was changed. Deploy again"
    done
    for file in "$incoming"/* "$incoming"/.[!.]*; do
        [[ -e $file ]] || continue
        name=${file##*/}
        [[ ,$names, == *",$name,"* && -f $file && ! -L $file ]] ||
            die "$EXIT_BAD_SECRETS" "$incoming holds ${name:0:80}, which this deploy did not send; nothing was changed"
        arrived+=("$name")
    done
    say "received ${#arrived[@]} secret(s): ${arrived[*]}"
}

# check_secrets_delivered NAMES: every secret the new system uses (nix/modules/secrets.nix) is one
# this deploy sent; a unit that loads a missing credential would not start.
check_secrets_delivered() {
    local names=",$1," name missing=() fields
    [[ -f $NEW_SYSTEM/$SECRET_UNITS_FILE ]] || return 0
    while read -r -a fields; do
        ((${#fields[@]} > 0)) || continue
        name=${fields[0]}
        [[ $names == *",$name,"* ]] || missing+=("$name")
    done <"$NEW_SYSTEM/$SECRET_UNITS_FILE"
    if ((${#missing[@]} > 0)); then
        die "$EXIT_SECRETS_MISSING" "the new system uses the secret(s) ${missing[*]} (nixosEc2.secrets), which this host does not get; this host was not changed. Give it them in nixos-ec2:hostSecrets (and set nixos-ec2:secret.<name>), or drop them from its configuration"
    fi
}

# prune_secret_sets: removes every set but the one in use and a pending deploy's two, and incoming
# sets of deploys that died.
prune_secret_sets() {
    local entry keep
    read_pending_secrets
    keep=" $(secret_set_in_use) $PS_ID $PS_PREVIOUS "
    for entry in "$SECRET_SETS"/*; do
        [[ -e $entry ]] || continue
        [[ $keep == *" ${entry##*/} "* ]] || rm -rf "$entry"
    done
    find "$SECRET_SETS" -maxdepth 1 -name '.incoming.*' -mmin +"$STALE_INCOMING_MINUTES" -exec rm -rf {} + 2>/dev/null || true
    # Under the lock, a set received by another deploy and not staged is that deploy's, dead.
    for entry in "$SECRET_SETS"/.received.*; do
        [[ -e $entry && $entry != "$SECRET_SETS/.received.$DEPLOY_ID" ]] && rm -rf "$entry"
    done
    return 0
}

# receive_secrets ID: under the lock, the checked incoming set moves where no sweep of stale
# uploads (another deploy's, after STALE_INCOMING_MINUTES) can reach it, however long the build.
receive_secrets() {
    local incoming=$SECRET_SETS/.incoming.$1
    if [[ -d $incoming ]]; then
        rm -rf "$SECRET_SETS/.received.$1"
        mv -T "$incoming" "$SECRET_SETS/.received.$1"
    fi
}

# stage_secrets ID NAMES: what deploy ID sent (NAMES "-": nothing, an empty set) becomes the set
# secrets.d/ID, owned by this user (root), directory 0700 and files 0400; pending-secrets names it
# and the set in use before it. A set that was sent and is gone fails the deploy: never an empty
# set in its place.
stage_secrets() {
    local id=$1 names=$2 set=$SECRET_SETS/$1 received=$SECRET_SETS/.received.$1
    [[ -d $SECRET_SETS ]] || mkdir -p "$SECRET_SETS"
    chmod 0700 "$SECRET_SETS"
    rm -rf "$set"
    if [[ -d $received ]]; then
        mv -T "$received" "$set"
    elif [[ $names == - ]]; then
        mkdir "$set"
    else
        die "$EXIT_BAD_SECRETS" "the secrets deploy $id sent ($names) are no longer on this host; nothing was changed. Deploy again"
    fi
    chmod 0700 "$set"
    find "$set" -mindepth 1 -maxdepth 1 -type f -exec chmod 0400 {} +
    printf '%s %s\n' "$id" "$(secret_set_in_use)" >"$PENDING_SECRETS_FILE"
    prune_secret_sets
    read_pending_secrets
}

# secrets_live ID: deploy ID's set is the one in use (in the boot it was prepared for).
secrets_live() {
    read_pending_secrets
    if [[ $PS_ID == "$1" && -d $SECRET_SETS/$1 ]]; then
        point_secrets_at "$1"
        say "deploy $1: its secrets are in place in $SECRETS_LINK"
    fi
}

# secrets_back ID: the link names the set in use before deploy ID again; SECRETS_WERE_LIVE says
# whether ID's set had been in use (then units may have read it).
SECRETS_WERE_LIVE=false
secrets_back() {
    SECRETS_WERE_LIVE=false
    read_pending_secrets
    [[ $PS_ID == "$1" ]] || return 0
    [[ $(secret_set_in_use) == "$1" ]] && SECRETS_WERE_LIVE=true
    point_secrets_at "$PS_PREVIOUS"
}

# forget_secrets ID keep|drop: deploy ID is over; keep: its set stays and the one before goes
# (a secret removed from the config is gone from the host now); drop: its own set goes.
forget_secrets() {
    local id=$1 how=$2
    read_pending_secrets
    [[ $PS_ID == "$id" ]] || return 0
    if [[ $how == keep ]]; then
        [[ $PS_PREVIOUS == - || $PS_PREVIOUS == "$id" || $PS_PREVIOUS == "$(secret_set_in_use)" ]] || rm -rf "${SECRET_SETS:?}/$PS_PREVIOUS"
    else
        [[ $(secret_set_in_use) == "$id" ]] || rm -rf "${SECRET_SETS:?}/$id"
    fi
    : >"$PENDING_SECRETS_FILE"
}

# changed_secrets A B: the names whose secret differs between sets A and B ("-": no set).
changed_secrets() {
    local a=$SECRET_SETS/$1 b=$SECRET_SETS/$2 file name
    local -A seen=()
    for file in "$a"/* "$b"/*; do
        [[ -f $file ]] || continue
        name=${file##*/}
        [[ -z ${seen[$name]:-} ]] || continue
        seen[$name]=1
        if [[ ! -f $a/$name || ! -f $b/$name ]] || ! cmp -s "$a/$name" "$b/$name"; then
            printf '%s\n' "$name"
        fi
    done
}

# secret_users SYSTEM A B: sets SECRET_USERS to the units SYSTEM declares for the secrets that
# differ between sets A and B (nix/modules/secrets.nix, restartUnits); none when no secret changed,
# even if SYSTEM uses secrets.
SECRET_USERS=()
secret_users() {
    local system=$1 changed=() units=() fields name
    SECRET_USERS=()
    mapfile -t changed < <(changed_secrets "$2" "$3")
    ((${#changed[@]} > 0)) || return 0
    if [[ -f $system/$SECRET_UNITS_FILE ]]; then
        while read -r -a fields; do
            ((${#fields[@]} > 1)) || continue
            for name in "${changed[@]}"; do
                [[ $name == "${fields[0]}" ]] && units+=("${fields[@]:1}")
            done
        done <"$system/$SECRET_UNITS_FILE"
    fi
    if ((${#units[@]} == 0)); then
        say "secrets changed (${changed[*]}); no unit of this system uses them"
        return 0
    fi
    mapfile -t SECRET_USERS < <(printf '%s\n' "${units[@]}" | sort -u)
    say "secrets changed (${changed[*]}): restarting ${SECRET_USERS[*]}"
}

# restart_secret_users SYSTEM A B [SECONDS]: restarts those units in one systemctl call, within
# SECONDS when given (systemctl waits for each unit's start job).
restart_secret_users() {
    secret_users "$1" "$2" "$3"
    ((${#SECRET_USERS[@]} > 0)) || return 0
    # Bounded also in a rollback (the timer's has no activation deadline at hand): a start that
    # hangs must not keep the lock for ever.
    with_deadline "restarting ${SECRET_USERS[*]}" "${4:-$SECRET_RESTART_SECONDS}" systemctl restart "${SECRET_USERS[@]}"
}

# Globals, not locals: the EXIT traps below run after switch_body has returned.
UPLOAD=""
DEPLOY_ID=""
PREVIOUS_GENERATION=""

on_switch_exit() {
    local status=$1
    rm -rf "$UPLOAD" "$SECRET_SETS/.incoming.$DEPLOY_ID" "$SECRET_SETS/.received.$DEPLOY_ID"
    if [[ -n $PREVIOUS_GENERATION ]] && ((status != 0 && status != EXIT_ROLLED_BACK && status != EXIT_ROLLBACK_FAILED && status != EXIT_ACTIVATION_TIMED_OUT && status != EXIT_REBOOT_REFUSED)); then
        roll_back "$DEPLOY_ID" "$PREVIOUS_GENERATION" "the switch step failed unexpectedly (exit status $status)" ||
            exit "$EXIT_ROLLBACK_FAILED"
        exit "$EXIT_ROLLED_BACK"
    fi
}

# refuse_reboot ID PREVIOUS: rebootPolicy is never and the new system needs a reboot. When the
# live switch found that out, its profile change (and, after exit 100, its boot loader) is undone;
# the running system was never changed.
refuse_reboot() {
    local id=$1 previous=$2
    if [[ -n $PREVIOUS_GENERATION ]]; then
        PREVIOUS_GENERATION=""
        disarm "$id"
        if ! nix-env -p "$SYSTEM_PROFILE" --switch-generation "$previous" ||
            ! "$(system_of_generation "$previous")/bin/switch-to-configuration" boot 9>&-; then
            record_outcome "$id" "rollback-failed generation=$previous reason=undoing a switch that needs a reboot"
            die "$EXIT_ROLLBACK_FAILED" "could not make generation $previous the profile and the boot default again"
        fi
    fi
    secrets_back "$id"
    forget_secrets "$id" drop
    record_outcome "$id" "refused generation=$previous reason=needs a reboot"
    die "$EXIT_REBOOT_REFUSED" "deploy $id needs a reboot: $REBOOT_REASON. rebootPolicy is never, so the host was not rebooted; it still runs and boots generation $previous. Set rebootPolicy to when-required (or hosts.<name>.rebootPolicy for this host) to deploy this change with a reboot"
}

ROLLBACK_SECONDS=""
switch_body() {
    local attr=$3 rollback_seconds=$4 allow=$5 build_seconds=$6 activate_seconds=$7 policy=$8 secrets=$9
    ROLLBACK_SECONDS=$rollback_seconds
    UPLOAD=$1
    DEPLOY_ID=$2
    trap 'on_switch_exit $?' EXIT
    say "deploy $DEPLOY_ID: switching this host to $attr"
    take_lock
    [[ -d $OUTCOMES_DIR ]] || mkdir -p "$OUTCOMES_DIR"
    prune_old_files
    roll_back_unconfirmed_deploy "$DEPLOY_ID"
    install_upload "$UPLOAD" "$DEPLOY_ID"
    check_incoming_secrets "$DEPLOY_ID" "$secrets"
    receive_secrets "$DEPLOY_ID"
    # A host that gets no secrets and has none (no link, no deploy's set pending) needs none of
    # the set handling below; that saves a deploy a dozen processes.
    local no_secrets=false
    read_pending_secrets
    if [[ $secrets == - && -z $PS_ID && ! -L $SECRETS_LINK && ! -e $SECRETS_LINK ]]; then
        no_secrets=true
    fi
    build_system "$attr" "$build_seconds"
    check_nixos_system "$attr"
    check_secrets_delivered "$secrets"
    local previous generation
    previous=$(current_generation)
    needs_reboot "$policy" "$activate_seconds"
    if [[ -z $REBOOT_REASON ]]; then
        arm_rollback "$DEPLOY_ID" "$previous" "$rollback_seconds"
        # From here on an unexpected failure rolls back at once instead of waiting for the timer.
        PREVIOUS_GENERATION=$previous
        if [[ $no_secrets == false ]]; then
            stage_secrets "$DEPLOY_ID" "$secrets"
            # The new system's services start (and restart) with the new secrets.
            point_secrets_at "$DEPLOY_ID"
        fi
        activate "$DEPLOY_ID" "$previous" "$allow" "$activate_seconds"
        if [[ -z $REBOOT_REASON ]]; then
            # Units whose secrets changed restart even when the system itself did not change.
            if [[ $no_secrets == false ]] && ! restart_secret_users "$NEW_SYSTEM" "$PS_PREVIOUS" "$DEPLOY_ID" "$activate_seconds"; then
                roll_back "$DEPLOY_ID" "$previous" "restarting the units that use changed secrets failed" || exit "$EXIT_ROLLBACK_FAILED"
                exit "$EXIT_ROLLED_BACK"
            fi
            generation=$(current_generation)
            record_outcome "$DEPLOY_ID" "switched generation=$generation"
            say "switched to generation $generation"
            return 0
        fi
        # Not live after all: the running system keeps its secrets until the new boot.
        if [[ $no_secrets == false ]]; then point_secrets_at "$PS_PREVIOUS"; fi
    fi
    say "the new system needs a reboot: $REBOOT_REASON"
    if [[ $policy == never ]]; then
        refuse_reboot "$DEPLOY_ID" "$previous"
    fi
    check_trial_boot_possible
    if [[ -z $PREVIOUS_GENERATION ]]; then
        # Until the reboot, the same timer undoes the prepared boot if the deploy goes away.
        arm_rollback "$DEPLOY_ID" "$previous" "$rollback_seconds"
        PREVIOUS_GENERATION=$previous
        # Staged only: the new boot puts them in place (boot-guard), before the units that use them.
        if [[ $no_secrets == false ]]; then stage_secrets "$DEPLOY_ID" "$secrets"; fi
    fi
    prepare_boot "$DEPLOY_ID" "$previous" "$activate_seconds"
}

# only_pending_certificates: true when the failed units are all orders of certificates that were
# never issued: nix/modules/web.nix turns HTTPS on with a domain before DNS points at the host,
# and the ACME module's acme-order-renew-<cert>.service (nixos/modules/security/acme/default.nix)
# fails with exit 10 when the order fails; <acme dir>/<cert>/acme-success appears with the first
# certificate. Such a certificate is pending, not broken: nixos-ec2-acme-retry.timer orders it
# again and plain HTTP keeps serving. Any other failed unit, another exit status, or a failed
# renewal of a certificate that was issued, counts as a failure. Says which certificate waits, and
# why: the ACME server's error from lego's output (`journalctl -u` also shows systemd's own lines
# about the unit, which come last and say nothing of the reason).
only_pending_certificates() {
    local units unit cert why pending=()
    units=$(systemctl --failed --no-legend --plain --no-pager 2>/dev/null | awk '{ print $1 }') || return 1
    [[ -n $units ]] || return 1
    while IFS= read -r unit; do
        [[ $unit =~ ^acme-order-renew-(.+)\.service$ ]] || return 1
        cert=${BASH_REMATCH[1]}
        [[ ! -e $ACME_DIR/$cert/acme-success ]] || return 1
        [[ $(systemctl show -p ExecMainStatus --value "$unit" 2>/dev/null) == 10 ]] || return 1
        pending+=("$cert")
    done <<<"$units"
    for cert in "${pending[@]}"; do
        why=$(journalctl -u "acme-order-renew-$cert.service" -n 50 -o cat --no-pager 2>/dev/null |
            grep -E 'urn:ietf:params:acme:error|acme: error' | tail -n 1) || why=""
        say "certificate for $cert not issued yet: ${why:-its order failed (exit status 10); see journalctl -u acme-order-renew-$cert}"
        say "certificate for $cert pending: HTTP keeps serving; nixos-ec2-acme-retry.timer orders it again (every 15 min at first, less often later)"
    done
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
        if only_pending_certificates; then
            say "systemd reports the system as degraded only by the pending certificate(s) above"
        elif [[ $allow == true ]]; then
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

# check_outcome ID: returns 0 when ID is confirmed already, 1 when it waits for its
# confirmation; ends the script when it was rolled back.
check_outcome() {
    local id=$1 outcome=""
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
    return 1
}

# check_new_system ALLOW SETTLE_S: the checks a new system passes after a live switch or a reboot.
check_new_system() {
    SETTLE_FAILURE=""
    HEALTH_FAILURE=""
    if ! settle "$1" "$2" || ! check_health; then
        CHECK_FAILURE=${SETTLE_FAILURE:-$HEALTH_FAILURE}
        say "error: $CHECK_FAILURE"
        return 1
    fi
}

confirm_body() {
    local id=$1 allow=$2 settle_seconds=$3 generation
    take_lock
    if check_outcome "$id"; then
        return 0
    fi
    read_pending
    if [[ $PENDING_ID != "$id" ]]; then
        die "$EXIT_BAD_STATE" "no rollback is armed for deploy $id (pending: ${PENDING_ID:-none}); a later deploy may have superseded it"
    fi
    generation=$PENDING_GENERATION
    disarm "$id"
    say "deploy $id: rollback disarmed; checking the new system"
    if ! check_new_system "$allow" "$settle_seconds"; then
        roll_back "$id" "$generation" "$CHECK_FAILURE" || exit "$EXIT_ROLLBACK_FAILED"
        exit "$EXIT_ROLLED_BACK"
    fi
    record_outcome "$id" "confirmed generation=$(current_generation)"
    forget_secrets "$id" keep
    say "deploy $id confirmed"
}

# After the reboot: the host must run the new system, booted (/run/booted-system and
# /run/current-system both the new toplevel; stage-2-init.sh links the former at boot), in a new
# boot (another boot ID), and pass the same checks; then the new generation becomes the profile
# and the boot default, and the rollback across the reboot is over.
confirm_boot_body() {
    local id=$1 allow=$2 settle_seconds=$3 booted current now
    take_lock
    if check_outcome "$id"; then
        return 0
    fi
    read_pending_boot
    if [[ $PB_ID != "$id" ]]; then
        die "$EXIT_BAD_STATE" "no reboot is pending for deploy $id (pending: ${PB_ID:-none})"
    fi
    now=$(boot_id)
    if [[ $now == "$PB_BOOT" ]]; then
        say "the host has not rebooted yet (boot ID $now)"
        exit "$EXIT_NOT_REBOOTED"
    fi
    booted=$(readlink -f "$RUN_DIR/booted-system" || true)
    current=$(readlink -f "$RUN_DIR/current-system" || true)
    if [[ $booted != "$PB_SYSTEM" || $current != "$PB_SYSTEM" ]]; then
        local reason="the host came back on ${booted:-an unknown system}, not on generation $PB_GENERATION ($PB_SYSTEM): the new boot failed and GRUB booted the default"
        forget_boot
        secrets_back "$id"
        forget_secrets "$id" drop
        note_rollback "$id" "$PB_PREVIOUS" "$reason"
        die "$EXIT_ROLLED_BACK" "$reason; generation $PB_PREVIOUS runs again"
    fi
    disarm "$id"
    say "deploy $id: generation $PB_GENERATION booted (boot ID $PB_BOOT before, $now now); rollback disarmed; checking the new system"
    if ! check_new_system "$allow" "$settle_seconds"; then
        reboot_back "$id" "$PB_PREVIOUS" "$CHECK_FAILURE"
        exit "$EXIT_ROLLED_BACK"
    fi
    if ! nix-env -p "$SYSTEM_PROFILE" --switch-generation "$PB_GENERATION" 9>&- ||
        ! "$PB_SYSTEM/bin/switch-to-configuration" boot 9>&-; then
        reboot_back "$id" "$PB_PREVIOUS" "making generation $PB_GENERATION the profile and the boot default failed"
        exit "$EXIT_ROLLED_BACK"
    fi
    forget_boot
    record_outcome "$id" "confirmed generation=$PB_GENERATION rebooted"
    secrets_live "$id"
    forget_secrets "$id" keep
    say "deploy $id confirmed; generation $PB_GENERATION is the boot default"
}

rollback_body() {
    local id=$1 reason
    take_lock
    read_pending
    if [[ $PENDING_ID != "$id" ]]; then
        say "deploy $id was confirmed or already rolled back; nothing to do"
        return 0
    fi
    reason="deploy $id was not confirmed within the rollback timeout"
    read_pending_boot
    if [[ $PB_ID == "$id" ]]; then
        if [[ $PB_BOOT == "$(boot_id)" ]]; then
            reason="deploy $id did not reboot the host within ${PB_WINDOW}s of preparing the boot"
        else
            reason="deploy $id was not confirmed within ${PB_WINDOW}s of booting generation $PB_GENERATION"
        fi
    fi
    roll_back "$id" "$PENDING_GENERATION" "$reason"
}

# At every boot (nixos-ec2-boot-guard.service, before sshd): a boot on trial arms its rollback;
# a boot that is not the one a deploy waits for means the new system failed to come up.
# record_failed_trial BOOTED: the boot a deploy waited for is not the one running.
record_failed_trial() {
    grub_editenv unset next_entry || say "warning: could not clear GRUB's next_entry"
    forget_boot
    secrets_back "$PB_ID"
    forget_secrets "$PB_ID" drop
    note_rollback "$PB_ID" "$PB_PREVIOUS" "the host did not come up on generation $PB_GENERATION and booted ${1:-an unknown system} (GRUB's default) instead"
    say "deploy $PB_ID: generation $PB_GENERATION did not come up; the host booted generation $PB_PREVIOUS again"
}

boot_guard_body() {
    local current old
    take_lock
    current=$(readlink -f "$RUN_DIR/current-system" || true)
    read_pending_boot
    if [[ -n $PB_ID && $PB_BOOT != "$(boot_id)" ]]; then
        # GRUB clears the one-shot entry as it boots it, unless it cannot write its environment
        # block; then every boot would try the new system again.
        grub_editenv unset next_entry || say "warning: could not clear GRUB's next_entry"
        if [[ $current == "$PB_SYSTEM" ]]; then
            arm_timer "$PB_ID" "$PB_WINDOW"
            # Before the units that use them (nix/modules/secrets.nix orders them after this unit).
            secrets_live "$PB_ID"
            record_outcome "$PB_ID" "booted generation=$PB_GENERATION"
            say "deploy $PB_ID: booted generation $PB_GENERATION on trial; unless the deploy confirms it within ${PB_WINDOW}s, the host reboots into generation $PB_PREVIOUS"
        else
            record_failed_trial "$current"
        fi
        return 0
    fi
    # A live switch that was not confirmed before the host rebooted: GRUB's default is the new
    # system, which booted with no timer. Not confirmed is rolled back, as the timer would have.
    read_pending
    [[ -n $PENDING_ID && -z $PB_ID ]] || return 0
    old=$(system_of_generation "$PENDING_GENERATION")
    if [[ $current == "$old" ]]; then
        nix-env -p "$SYSTEM_PROFILE" --switch-generation "$PENDING_GENERATION" 9>&- || true
        "$old/bin/switch-to-configuration" boot 9>&- || say "warning: reinstalling the boot loader for generation $PENDING_GENERATION failed"
        # Before the units that use them start (nix/modules/secrets.nix orders them after this unit).
        secrets_back "$PENDING_ID"
        forget_secrets "$PENDING_ID" drop
        forget_boot
        note_rollback "$PENDING_ID" "$PENDING_GENERATION" "the host rebooted into generation $PENDING_GENERATION before deploy $PENDING_ID was confirmed"
        say "deploy $PENDING_ID was not confirmed before the reboot; generation $PENDING_GENERATION runs and is the default again"
    else
        reboot_back "$PENDING_ID" "$PENDING_GENERATION" "the host rebooted before deploy $PENDING_ID was confirmed"
    fi
}

# Over connection 1, once the switch unit prepared the boot: reboot into the new system.
reboot_body() {
    local id=$1
    take_lock
    read_pending_boot
    if [[ $PB_ID != "$id" || $PB_BOOT != "$(boot_id)" ]]; then
        die "$EXIT_BAD_STATE" "no reboot is prepared for deploy $id in this boot (pending: ${PB_ID:-none})"
    fi
    # The prepared boot is final now; the rollback of the trial boot is armed at that boot.
    systemctl stop "$(rollback_unit "$id").timer" >/dev/null 2>&1 || true
    # nixos-deploy.sh looks for this line: a session that drops after it was the reboot.
    say "deploy $id: rebooting into generation $PB_GENERATION"
    if ! systemctl reboot 9>&-; then
        undo_boot "$id" "$PB_PREVIOUS" "systemctl reboot failed" || exit "$EXIT_ROLLBACK_FAILED"
        exit "$EXIT_ROLLED_BACK"
    fi
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
    local upload=$1 id=$2 attr=$3 rollback_seconds=$4 allow=$5 build_seconds=$6 activate_seconds=$7 policy=$8 secrets=$9 log status=0 generation=""
    [[ -d $LOG_DIR ]] || mkdir -p "$LOG_DIR"
    log=$LOG_DIR/$(printf '%(%Y%m%dT%H%M%S)T' -1)-$id.log
    : >"$log"
    ln -sfn "logs/${log##*/}" "$STATE_DIR/deploy.log"
    # First stdout line: nixos-deploy.sh points its hints at this log only once it exists.
    printf 'log=%s\n' "$log"
    run_unit "nixos-ec2-switch-$id" "nixos-ec2: deploy $id, switch to $attr" \
        switch "$upload" "$id" "$attr" "$rollback_seconds" "$allow" "$build_seconds" "$activate_seconds" "$policy" "$secrets" "$log" || status=$?
    # nixos-deploy.sh names the generation a rollback returns to in its messages.
    read_pending
    if [[ $PENDING_ID == "$id" ]]; then
        generation=$PENDING_GENERATION
    elif [[ -f $OUTCOMES_DIR/$id && $(<"$OUTCOMES_DIR/$id") =~ generation=([0-9]+) ]]; then
        generation=${BASH_REMATCH[1]}
    fi
    # nixos-deploy.sh asks for the reboot, then waits for a boot ID other than this one.
    if ((status == 0)) && [[ $(<"$OUTCOMES_DIR/$id") == rebooting* ]]; then
        printf 'reboot=%s\n' "$(boot_id)"
    fi
    printf '%s\n' "$generation"
    if ((status != 0)); then
        print_log_tail "$log" >&2
    fi
    exit "$status"
}

# cmd_confirm MODE ID ALLOW SETTLE_S: MODE is confirm (after a live switch) or confirm-boot.
cmd_confirm() {
    local mode=$1 id=$2 allow=$3 settle_seconds=$4 log status=0 path generation rebooted=false
    log=$(log_of "$id")
    [[ $mode == confirm-boot ]] && rebooted=true
    run_unit "nixos-ec2-$mode-$id-$$" "nixos-ec2: $mode deploy $id" \
        "$mode-unit" "$id" "$allow" "$settle_seconds" "$log" || status=$?
    if ((status != 0)); then
        ((status == EXIT_NOT_REBOOTED)) || print_log_tail "$log" >&2
        exit "$status"
    fi
    generation=$(current_generation)
    cd -P "$SYSTEM_PROFILE"
    path=$PWD
    printf '{"systemPath":"%s","generation":%s,"rebooted":%s}\n' "$path" "$generation" "$rebooted"
}

usage() {
    die 64 "usage: remote-switch.sh deploy|switch|reboot|confirm|confirm-unit|confirm-boot|confirm-boot-unit|rollback|boot-guard ARGS... (called by nixos-deploy.sh)"
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
        need_args 9 "$@"
        cmd_deploy "$@"
        ;;
    switch)
        need_args 10 "$@"
        with_log "${10}" switch_body "${@:1:9}"
        ;;
    reboot)
        need_args 1 "$@"
        with_log "$(log_of "$1")" reboot_body "$1"
        ;;
    confirm | confirm-boot)
        need_args 3 "$@"
        cmd_confirm "$command" "$@"
        ;;
    confirm-unit)
        need_args 4 "$@"
        with_log "$4" confirm_body "${@:1:3}"
        ;;
    confirm-boot-unit)
        need_args 4 "$@"
        with_log "$4" confirm_boot_body "${@:1:3}"
        ;;
    boot-guard)
        need_args 0 "$@"
        read_pending_boot
        read_pending
        # Quiet when no deploy waits for its confirmation: this runs at every boot.
        [[ -n $PB_ID || -n $PENDING_ID ]] || exit 0
        with_log "$(log_of "${PB_ID:-$PENDING_ID}")" boot_guard_body
        ;;
    rollback)
        need_args 1 "$@"
        with_log "$(log_of "$1")" rollback_body "$1"
        ;;
    *) usage ;;
    esac
}

main "$@"
