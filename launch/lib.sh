# shellcheck shell=bash
# launch/lib.sh: the shell helpers tpu.sh and gpu.sh share (sourced; needs PROG and DRY_RUN set
# and fd 3 open on the script's stdout: exec 3>&1).
die() { # usage error: one line, exit 2
  echo "$PROG: error: $*" >&2
  exit 2
}

# shq WORD: sets REPLY to WORD quoted for a POSIX shell (unchanged when it holds only safe
# characters; a --flag=VALUE word keeps --flag= outside the quotes: --command='...').
# No subshells: a dry run of a 64-host slice stays fast.
shq() {
  local s=$1 head="" out="" flag_re='^--[A-Za-z0-9][-A-Za-z0-9_.]*='
  if [[ $s =~ $flag_re ]]; then
    head=${BASH_REMATCH[0]}
    s=${s#"$head"}
    if [[ -z $s ]]; then REPLY=$head; return; fi
  fi
  case $s in
    '') REPLY="$head''"; return ;;
    *[!A-Za-z0-9_./:=@%+,-]*) ;;
    *) REPLY=$head$s; return ;;
  esac
  while [[ $s == *\'* ]]; do
    out="$out${s%%\'*}'\\''"
    s=${s#*\'}
  done
  REPLY="$head'$out$s'"
}

# quote_cmd ARGS...: sets REPLY to the argument list as one copy-pasteable shell line.
quote_cmd() {
  local a line=""
  for a in "$@"; do
    shq "$a"
    line="$line${line:+ }$REPLY"
  done
  REPLY=$line
}

# run [--log FILE] CMD ARGS...: the one place where commands are issued. --dry-run prints the
# command line on the script's stdout (fd 3, so that $(run ...) does not swallow it); otherwise
# it is traced on stderr and executed, and with --log its output is also appended to FILE.
run() {
  local log="" line
  if [[ $1 == --log ]]; then log=$2; shift 2; fi
  quote_cmd "$@"
  line=$REPLY
  if [[ -n $log ]]; then
    shq "$log"
    line="$line 2>&1 | tee -a $REPLY"
  fi
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$line" >&3
    return 0
  fi
  printf '+ %s\n' "$line" >&2
  if [[ -n $log ]]; then
    "$@" 2>&1 | tee -a "$log"
  else
    "$@"
  fi
}

note() { # a comment in the dry-run listing, a progress line otherwise
  if [[ $DRY_RUN == 1 ]]; then printf '# %s\n' "$*" >&3; else printf '==> %s\n' "$*" >&2; fi
}
