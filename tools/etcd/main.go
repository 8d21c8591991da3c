// Command etcd is the upstream etcd server, built from go.etcd.io/etcd/server/v3. The module's own
// go.mod carries relative replace lines, so `go install` cannot build it directly.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
