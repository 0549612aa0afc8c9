/* Not a kernel: a guard for memory-mapped checkpoints. A file that shrinks while it is mapped (a
 * copy or a download rewriting it) turns the next read of the lost pages into SIGBUS, which kills
 * the process with a bare "Bus error". This handler says what happened instead, then exits: the
 * mapped weights are gone, so the process cannot go on. Only async-signal-safe calls. */
#include <signal.h>
#include <unistd.h>

static char sigbus_message[2048];

static void on_sigbus(int sig) {
    (void)sig;
    ssize_t written = write(2, sigbus_message, strlen(sigbus_message));
    (void)written;
    _exit(135);
}

void groklm_guard_sigbus(const char *message) {
    strncpy(sigbus_message, message, sizeof sigbus_message - 1);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigbus;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, NULL);
}
