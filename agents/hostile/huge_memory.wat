;; hostile: declares 4096 pages (256 MiB) of initial memory, more than any default limit.
(module
  (memory (export "memory") 4096)
  (func (export "_start")))
