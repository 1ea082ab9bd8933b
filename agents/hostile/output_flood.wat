;; hostile: writes the same 60 KiB buffer to stdout forever (fd_write on fd 1).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    ;; iovec at 0: buf = 1024, len = 61440
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 61440))
    (loop $forever
      (if (i32.ne (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 0))
        (then (return)))
      (br $forever))))
