# The demo's view of a training log (examples/quickstart.sh): one compact line every ~10% of the run, the
# validation loss, and the start/save/load lines. Run as `awk -v name=PHASE -f examples/demo_progress.awk`.
# The trainer prints an iteration's figures as Megatron's `a | b | ...` line cut into lines of at most 160
# columns (training/logger.py fit_width): "iteration i/n" and the step time on the first, "lm loss" on a later
# one; so the iteration is remembered until its loss arrives, on the same line or a later one.

# the number after "LABEL: " in the text matched by the last match()
function matched_value(   s) { s = substr($0, RSTART, RLENGTH); sub(/.*: /, "", s); return s + 0 }

/iteration +[0-9]+\/ *[0-9]+/ && !/validation loss/ {
  match($0, /iteration +[0-9]+\/ *[0-9]+/); split(substr($0, RSTART + 9, RLENGTH - 9), it, "/")
  i = it[1] + 0; n = it[2] + 0; k = int(n / 10); if (k < 1) k = 1
  ms = match($0, /per iteration \(ms\): [0-9.]+/) ? matched_value() : 0
  pending = 1
}
pending && match($0, /lm loss: [0-9.E+-]+/) {
  if (i == 1 || i == n || i % k == 0) printf "   %s: iteration %3d/%d  loss %.3f  (%.1f s/it)\n", name, i, n, matched_value(), ms / 1000
  pending = 0; next
}
/validation loss at iteration/ { pending = 0; valid = 1 }
valid && match($0, /lm loss value: [0-9.E+-]+/) { printf "   %s: validation loss %.3f\n", name, matched_value(); valid = 0; next }
/training from iteration|saved checkpoint|loading checkpoint|weights only/ { sub(/^\[rank [0-9]+\] /, ""); print "   " name ": " $0 }
