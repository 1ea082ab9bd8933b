;; hostile: spins forever in _start. Stopped by fuel or by the epoch deadline.
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
