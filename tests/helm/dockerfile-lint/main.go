// dockerfile-lint runs BuildKit's own Dockerfile checks, the ones
// `docker build --check` runs (github.com/moby/buildkit/frontend/dockerfile:
// parser, instructions and every lint rule), on a Dockerfile, without a
// container engine and without asking a registry about the base images. It prints each
// warning with its line and exits 1 if there is any warning or error.
//
//	dockerfile-lint Dockerfile
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/solver/pb"
	digest "github.com/opencontainers/go-digest"
)

// offlineImages answers every base image lookup with an empty linux/amd64
// image (a PATH and nothing else), so no registry is asked: the checks are
// about the Dockerfile, not about the images it names. (Rules that need the
// real image, such as InvalidBaseImagePlatform, cannot fire here.)
type offlineImages struct{}

func (offlineImages) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}}`)
	return ref, digest.FromBytes(config), config, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: dockerfile-lint DOCKERFILE")
		os.Exit(2)
	}
	dt, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// The source map only labels the warnings (no build state: nothing is built).
	sm := llb.NewSourceMap(nil, os.Args[1], "Dockerfile", dt)
	sm.Definition = &llb.Definition{}
	opt := dockerfile2llb.ConvertOpt{SourceMap: sm, MetaResolver: offlineImages{}}
	res, err := dockerfile2llb.DockerfileLint(context.Background(), dt, opt)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := res.PrintTo(os.Stdout, func(s *pb.SourceInfo) *pb.SourceInfo { return s }); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if res.Error != nil {
		fmt.Printf("ERROR: %s (line %d)\n", res.Error.Message, firstLine(res.Error.Location))
	}
	if res.Error != nil || len(res.Warnings) > 0 {
		fmt.Printf("%s: %d warning(s)%s\n", os.Args[1], len(res.Warnings), map[bool]string{true: ", 1 error", false: ""}[res.Error != nil])
		os.Exit(1)
	}
	fmt.Printf("%s: no warnings (BuildKit's Dockerfile checks)\n", os.Args[1])
}

func firstLine(loc pb.Location) int32 {
	if len(loc.Ranges) > 0 {
		return loc.Ranges[0].Start.Line
	}
	return 0
}
