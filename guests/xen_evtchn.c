#include "xen_guest.h"
int main(const struct hvm_start_info *si) { (void)si; if (!xen_init()) return 1; return 0; }
