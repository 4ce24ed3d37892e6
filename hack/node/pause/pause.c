/* The pod sandbox's pause process for the node kit (scripts/build-node-kit.sh builds it with gcc -static -Os).
 * registry.k8s.io cannot be pulled here, so containerd's sandbox image is a local image holding this program.
 * It holds the pod's namespaces open: it blocks until SIGTERM or SIGINT and then exits 0, and as PID 1 of a pod
 * that shares its PID namespace it reaps every child that exits (else they stay zombies). */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PAUSE_VERSION
#define PAUSE_VERSION "unknown"
#endif

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
    printf("pause %s (llama-operator node kit)\n", PAUSE_VERSION);
    return 0;
  }
  if (getpid() != 1) {
    /* Not an error (the tests run it outside a container): the pod's shared PID namespace is the usual home. */
    fprintf(stderr, "pause: not PID 1, still waiting for SIGTERM/SIGINT\n");
  }
  struct sigaction on_stop = {.sa_handler = stop};
  struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
  if (sigaction(SIGINT, &on_stop, NULL) < 0 || sigaction(SIGTERM, &on_stop, NULL) < 0 ||
      sigaction(SIGCHLD, &on_child, NULL) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  reap(0); /* a child that exited before the handler was in place sent its SIGCHLD to nobody */
  for (;;) {
    pause();
  }
}
