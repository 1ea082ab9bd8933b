;; hostile: imports a function no host provides (module "evil").
(module
  (import "evil" "syscall" (func $syscall (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $syscall (i32.const 0)))))
