#include "postgres.h"
#include "stripe_meter.h"
void StripeMeterRegisterLauncher(void) {}
