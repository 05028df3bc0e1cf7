#!/usr/bin/env bash
# Helpers that launch/tpu.sh and launch/xpk.sh source: errors, shell quoting, dry-run printing.
# The caller sets DRY_RUN (1: print commands, run nothing).

PROG=${0##*/}  # the script's name, in messages

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }

# The argument as a shell reads it back: bare when plain, else single-quoted.
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The command as one pasteable line.
print_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shq "$a")"; done
  printf '%s\n' "$out"
}

# Under --dry-run prints the command on stdout; else echoes it on stderr and runs it.
x() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    printf '+ %s\n' "$(print_cmd "$@")" >&2
    "$@"
  fi
}

# After the arguments are read: --help prints the usage of the first step given (or the general
# one), no step at all is a usage error. Each script defines its own `usage [STEP]`.
usage_if_asked() {  # HELP STEP_COUNT FIRST_STEP
  if (($1)); then
    usage "$3"
    exit 0
  fi
  if (($2 == 0)); then
    usage >&2
    exit 2
  fi
}
