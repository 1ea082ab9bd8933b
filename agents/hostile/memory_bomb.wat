;; hostile: grows linear memory one 64 KiB page at a time until memory.grow
;; returns -1 (the store's memory limit), then traps with unreachable.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (block $full
      (loop $more
        (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
    unreachable))
