// Command etcd: the upstream etcd server main, used only when Debian's etcd-server is unavailable.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
