;; vecstats: an actor agent written by hand in WAT (no libc, no WASI).
;;
;; A message is a vector of n little-endian IEEE-754 doubles (8*n bytes,
;; n >= 0). The agent replies to the sender with 24 bytes: sum, min, max as
;; little-endian doubles (min = +inf and max = -inf for an empty vector). A
;; message whose length is not a multiple of 8 is a handler error (returns 1).
;;
;; Exports (docs/AGENTS.md actor ABI):
;;   memory
;;   alloc(size: i32) -> i32      buffer at offset 1024, grown on demand; 0 if memory is full
;;   handle(from_ptr, from_len, msg_ptr, msg_len: i32) -> i32
;;   sum_f64(ptr: i32, n: i32) -> f64   plain kernel, used by benchmarks/bench_wasm.py
;; Imports: chimera.send(to_ptr, to_len, msg_ptr, msg_len) -> i32
(module
  (import "chimera" "send" (func $send (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $inbox i32 (i32.const 1024))
  (global $reply i32 (i32.const 64))

  (func $alloc (export "alloc") (param $size i32) (result i32)
    (local $need i32) (local $pages i32)
    (if (i32.lt_s (local.get $size) (i32.const 0)) (then (return (i32.const 0))))
    ;; bytes needed = 1024 + size, in 64 KiB pages, rounded up
    (local.set $need (i32.add (global.get $inbox) (local.get $size)))
    (local.set $pages (i32.shr_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (return (i32.const 0))))))
    (global.get $inbox))

  (func $sum (export "sum_f64") (param $ptr i32) (param $n i32) (result f64)
    (local $acc f64) (local $end i32)
    (local.set $end (i32.add (local.get $ptr) (i32.shl (local.get $n) (i32.const 3))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $ptr) (local.get $end)))
        (local.set $acc (f64.add (local.get $acc) (f64.load (local.get $ptr))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 8)))
        (br $next)))
    (local.get $acc))

  (func $handle (export "handle")
        (param $from i32) (param $from_len i32) (param $msg i32) (param $len i32) (result i32)
    (local $p i32) (local $end i32) (local $x f64) (local $sum f64) (local $lo f64) (local $hi f64)
    (if (i32.and (local.get $len) (i32.const 7)) (then (return (i32.const 1))))
    (local.set $lo (f64.const inf))
    (local.set $hi (f64.const -inf))
    (local.set $p (local.get $msg))
    (local.set $end (i32.add (local.get $msg) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $x (f64.load (local.get $p)))
        (local.set $sum (f64.add (local.get $sum) (local.get $x)))
        (local.set $lo (f64.min (local.get $lo) (local.get $x)))
        (local.set $hi (f64.max (local.get $hi) (local.get $x)))
        (local.set $p (i32.add (local.get $p) (i32.const 8)))
        (br $next)))
    (f64.store (global.get $reply) (local.get $sum))
    (f64.store (i32.add (global.get $reply) (i32.const 8)) (local.get $lo))
    (f64.store (i32.add (global.get $reply) (i32.const 16)) (local.get $hi))
    (drop (call $send (local.get $from) (local.get $from_len) (global.get $reply) (i32.const 24)))
    (i32.const 0))
)
