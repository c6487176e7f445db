// Pure JVM Kotlin: protocol, speculation loop, controllers, OkHttp transport. No android.* imports, so the same
// code runs in the app and in CI's JVM tests.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    api("com.squareup.okhttp3:okhttp:4.12.0")
    // org.json is part of Android; on the JVM use AOSP's copy (CI uses Debian's libandroid-json-java, the same code).
    compileOnly("com.vaadin.external.google:android-json:0.0.20131108.vaadin1")
    testImplementation("com.vaadin.external.google:android-json:0.0.20131108.vaadin1")
    testImplementation("org.junit.jupiter:junit-jupiter:5.10.2")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
}

tasks.test {
    // E2eTest needs a running `wisp serve` and a recording: android_demo/ci.sh sets that up.
    useJUnitPlatform { excludeTags("e2e") }
}
