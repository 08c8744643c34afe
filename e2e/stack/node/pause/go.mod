module ballast.dev/e2e/stack/pause

go 1.24
